"""Installed package versions, as every output's provenance records them.

>>> package_version("no-such-package-here")
'not installed'
"""

from importlib import metadata

# The packages a run's numbers depend on, recorded in every JSON.
RECORDED = ("lens_compare", "transformer-lens", "torch", "transformers", "bitsandbytes")


def package_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def recorded_versions() -> dict[str, str]:
    return {package: package_version(package) for package in RECORDED}
