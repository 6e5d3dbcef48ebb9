"""The seed's ``residual_compare.local_run`` guard: run on the local GPU only when it is
the GPU the config names and the pair is explicitly allowed; otherwise stop at once.

``min_vram_gb`` is compared in decimal gigabytes (10**9 bytes) against torch's
``total_memory``, as its name says. Cards are marketed by binary-ish capacity and the
driver reports a little less (an RTX 4090 reports 24564 MiB = 23.99 GiB = 25.76 GB), so
a ``min_vram_gb: 24`` check accepts a 4090 in GB, where a GiB comparison would reject
the very card the seed's example is written for. The log line shows GiB.

>>> cfg = LocalRunConfig.from_dict({"enabled": True, "min_vram_gb": 24,
...     "require_gpu_name_substring": "4090", "allowed_pairs": [{"base": "gpt2", "sft": "gpt2",
...     "dtype": "float16"}]})
>>> gpu = GpuFacts("NVIDIA GeForce RTX 4090", 0, 24564 * 2**20 / 2**30)
>>> check_local_run(cfg, "gpt2", "gpt2", gpu).log_line
'Local GPU execution enabled: NVIDIA GeForce RTX 4090 (cuda:0, 23.99 GiB total VRAM)'
"""

import difflib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from lens_compare.errors import ConfigError, HardwareError
from lens_compare.util.choices import DTYPES
from lens_compare.util.units import GIB

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class AllowedPair:
    base: str
    sft: str
    device: str = "cuda"
    dtype: str | None = None
    tokenizer: str | None = None
    tokenizer_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    notes: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LocalRunConfig:
    enabled: bool = False
    min_vram_gb: float = 0.0
    require_gpu_name_substring: str | None = None
    cuda_device_index: int = 0
    allowed_pairs: tuple[AllowedPair, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["allowed_pairs"] = [p.to_dict() for p in self.allowed_pairs]
        return out

    @classmethod
    def from_dict(cls, data: Any, path: str = "residual_compare.local_run") -> "LocalRunConfig":
        """Validate a ``local_run`` mapping; every problem is reported in one ConfigError."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping, got {data!r}")
        top = _check(data, path, _TOP_FIELDS, problems)
        pairs = []
        raw_pairs = data.get("allowed_pairs", [])
        if not isinstance(raw_pairs, list):
            problems.append(f"{path}.allowed_pairs: expected a list of mappings, got {raw_pairs!r}")
            raw_pairs = []
        for i, entry in enumerate(raw_pairs):
            where = f"{path}.allowed_pairs[{i}]"
            if not isinstance(entry, dict):
                problems.append(f"{where}: expected a mapping with base and sft, got {entry!r}")
                continue
            values = _check(entry, where, _PAIR_FIELDS, problems)
            for required in ("base", "sft"):
                if required not in entry:
                    problems.append(f"{where}.{required}: missing (each allowed pair names both models)")
            if isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES:
                problems.append(f"{where}.dtype: {entry['dtype']!r} is not one of {', '.join(DTYPES)}")
            device = entry.get("device")
            if isinstance(device, str) and not _DEVICE.match(device):
                problems.append(f"{where}.device: {device!r} is not 'cuda', 'cuda:N' or 'cpu'")
            if "base" in entry and "sft" in entry:
                pairs.append(AllowedPair(**values))
        if isinstance(top.get("min_vram_gb"), (int, float)) and top["min_vram_gb"] < 0:
            problems.append(f"{path}.min_vram_gb: {top['min_vram_gb']!r} must be >= 0")
        if isinstance(top.get("cuda_device_index"), int) and top["cuda_device_index"] < 0:
            problems.append(f"{path}.cuda_device_index: {top['cuda_device_index']!r} must be >= 0")
        if problems:
            raise ConfigError(f"invalid {path}:\n  " + "\n  ".join(problems))
        top.pop("allowed_pairs", None)
        if "min_vram_gb" in top:
            top["min_vram_gb"] = float(top["min_vram_gb"])
        return cls(**top, allowed_pairs=tuple(pairs))


_TOP_FIELDS: dict[str, tuple[type, ...]] = {
    "enabled": (bool,),
    "min_vram_gb": (int, float),
    "require_gpu_name_substring": (str, type(None)),
    "cuda_device_index": (int,),
    "allowed_pairs": (list,),
}
_PAIR_FIELDS: dict[str, tuple[type, ...]] = {
    "base": (str,),
    "sft": (str,),
    "device": (str,),
    "dtype": (str, type(None)),
    "tokenizer": (str, type(None)),
    "tokenizer_kwargs": (dict,),
    "model_kwargs": (dict,),
    "notes": (str, type(None)),
}


def _check(data: dict, where: str, fields: dict[str, tuple[type, ...]], problems: list[str]) -> dict:
    good = {}
    for key, value in data.items():
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            problems.append(
                f"{where}.{key}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; allowed: {', '.join(fields)}"
            )
        # bool is an int subclass: refuse `min_vram_gb: true` and `cuda_device_index: false`.
        elif not isinstance(value, fields[key]) or (isinstance(value, bool) and bool not in fields[key]):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in fields[key])
            problems.append(f"{where}.{key}: expected {names}, got {value!r}")
        else:
            good[key] = value
    return good


@dataclass(frozen=True)
class GpuFacts:
    name: str
    index: int
    total_gib: float


def query_cuda_device(index: int) -> GpuFacts | None:
    """Facts of ``cuda:index`` from torch; None when CUDA is unavailable."""
    import torch

    if not torch.cuda.is_available():
        return None
    if index >= torch.cuda.device_count():
        raise HardwareError(
            f"cuda_device_index {index} does not exist: this machine has "
            f"{torch.cuda.device_count()} CUDA device(s); set residual_compare.local_run.cuda_device_index"
        )
    props = torch.cuda.get_device_properties(index)
    return GpuFacts(props.name, index, props.total_memory / GIB)


@dataclass(frozen=True)
class LocalRunApproval:
    device: str
    dtype: str | None
    tokenizer: str | None
    tokenizer_kwargs: dict[str, Any]
    model_kwargs: dict[str, Any]
    gpu: GpuFacts
    log_line: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_local_run(cfg: LocalRunConfig, base: str, sft: str, gpu: GpuFacts | None) -> LocalRunApproval:
    """Approve ``base``/``sft`` for the local GPU or raise HardwareError with the reason."""
    where = "residual_compare.local_run"
    if not cfg.enabled:
        raise HardwareError(f"{where}.enabled is false; local GPU execution was not requested")
    if gpu is None:
        raise HardwareError(f"{where} is enabled but CUDA is not available on this machine")
    if cfg.require_gpu_name_substring and cfg.require_gpu_name_substring not in gpu.name:
        raise HardwareError(
            f"GPU cuda:{gpu.index} is {gpu.name!r}, which does not contain "
            f"require_gpu_name_substring {cfg.require_gpu_name_substring!r}"
        )
    total_gb = gpu.total_gib * GIB / 1e9
    if total_gb < cfg.min_vram_gb:
        raise HardwareError(
            f"GPU cuda:{gpu.index} ({gpu.name}) has {total_gb:.2f} GB ({gpu.total_gib:.2f} GiB) "
            f"total VRAM, below min_vram_gb {cfg.min_vram_gb} GB"
        )
    entry = next((p for p in cfg.allowed_pairs if (p.base, p.sft) == (base, sft)), None)
    if entry is None:
        allowed = ", ".join(f"{p.base} vs {p.sft}" for p in cfg.allowed_pairs) or "none"
        raise HardwareError(
            f"pair {base} vs {sft} is not in {where}.allowed_pairs (allowed: {allowed}); add it "
            "there to run it locally"
        )
    device = entry.device
    if device == "cuda":
        # A bare 'cuda' means the device that was just checked, not whatever cuda:0 is.
        device = f"cuda:{gpu.index}"
    elif device.startswith("cuda:") and int(device.split(":")[1]) != gpu.index:
        raise HardwareError(
            f"allowed pair {base} vs {sft} asks for {device}, but the checked GPU is cuda:{gpu.index}"
        )
    log = f"Local GPU execution enabled: {gpu.name} (cuda:{gpu.index}, {gpu.total_gib:.2f} GiB total VRAM)"
    return LocalRunApproval(device, entry.dtype, entry.tokenizer, dict(entry.tokenizer_kwargs),
                            dict(entry.model_kwargs), gpu, log)
