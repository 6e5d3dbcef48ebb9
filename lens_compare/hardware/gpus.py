"""The GPU catalog: ``gpus.json`` facts plus the planner's prices, throughput and aliases.

>>> resolve_gpu("a100-40gb").name, resolve_gpu("h100").name
('A100 40GB', 'H100 SXM 80GB')
"""

import difflib
import json
import re
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from lens_compare.errors import ConfigError
from lens_compare.util.units import GIB


@dataclass(frozen=True)
class GpuType:
    name: str
    memory_gb: float
    # Capacity nvidia-smi reports, in GiB: what the planner fills.
    usable_gib: float
    bandwidth_gbps: float
    bf16: bool
    fp8: bool
    dense_tflops: float | None
    price_per_hour: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def _facts() -> dict[str, Any]:
    return yaml.safe_load(
        resources.files("lens_compare.hardware").joinpath("gpu_facts.yaml").read_text()
    )


def _optional_float(value: int | float | None) -> float | None:
    return None if value is None else float(value)


@cache
def gpu_catalog() -> dict[str, GpuType]:
    raw = json.loads(resources.files("lens_compare.data").joinpath("gpus.json").read_text())
    facts = _facts()
    catalog = {}
    for name, entry in raw.items():
        if name.startswith("_"):
            continue
        usable = entry.get("usable_GiB_typical")
        if usable is None:
            # B200 lists no nvidia-smi figure; take the marketed GB as decimal bytes,
            # which is below any binary-sized capacity the driver could report.
            usable = entry["memory_GB"] * 1e9 / GIB
        catalog[name] = GpuType(
            name=name,
            memory_gb=float(entry["memory_GB"]),
            usable_gib=float(usable),
            bandwidth_gbps=float(entry["bandwidth_GBps"]),
            bf16=bool(entry.get("bf16_native", False)),
            fp8=bool(entry.get("fp8", False)),
            dense_tflops=_optional_float(facts["dense_tflops_16bit"].get(name)),
            price_per_hour=_optional_float(facts["prices_usd_per_hour"].get(name)),
        )
    return catalog


def _normalise(name: str) -> str:
    lowered = name.lower()
    for word in ("nvidia", "geforce", "tesla"):
        lowered = lowered.replace(word, "")
    return re.sub(r"[^a-z0-9]", "", lowered)


@cache
def _alias_table() -> dict[str, str]:
    table = {_normalise(key): key for key in gpu_catalog()}
    for key, aliases in _facts()["aliases"].items():
        for alias in aliases:
            table[_normalise(str(alias))] = key
    return table


def resolve_gpu(name: str) -> GpuType:
    """A catalog entry by key or alias, case-insensitively; unknown names get a suggestion."""
    table = _alias_table()
    key = table.get(_normalise(name))
    if key is not None:
        return gpu_catalog()[key]
    close = difflib.get_close_matches(_normalise(name), list(table), n=6, cutoff=0.5)
    suggestions = list(dict.fromkeys(table[c] for c in close))[:3]
    hint = (
        " Did you mean " + " or ".join(repr(key) for key in suggestions) + "?"
        if close
        else ""
    )
    raise ConfigError(
        f"unknown GPU {name!r}.{hint} Known GPUs (keys of gpus.json): "
        f"{', '.join(gpu_catalog())}; aliases such as 'h100', '4090', 'a100-40gb' also work."
    )


def match_device_name(device_name: str, total_gib: float) -> GpuType | None:
    """The catalog entry for a torch device name (``NVIDIA A100-SXM4-40GB``), or None."""
    lowered = device_name.lower()
    hits = [
        gpu_catalog()[key]
        for key, patterns in _facts()["device_patterns"].items()
        if any(re.search(p, lowered) for p in patterns)
    ]
    if not hits:
        return None
    return min(hits, key=lambda g: abs(g.usable_gib - total_gib))
