"""How one model is loaded, as data: the preflight (the planner) fills it in, the loader reads it.

>>> LoadOptions("bfloat16", "cuda:0").describe()
'bfloat16 on cuda:0'
>>> LoadOptions("float32", "cpu", quantization="nf4").describe()
'nf4 weights (float32 compute) on cpu'
"""

from dataclasses import dataclass, field
from typing import Any

from lens_compare.errors import ConfigError

QUANTIZATIONS = ("nf4",)


@dataclass(frozen=True)
class LoadOptions:
    """Everything that decides how one checkpoint becomes a model in memory.

    ``device`` is where the model runs when it is not split; ``device_map`` (module
    name -> GPU index, or ``cpu``/``disk`` in tests of the dispatch path) splits it
    by whole blocks instead, with ``max_memory`` the per-device budgets it was
    computed with. ``quantization`` is ``None`` (weights in ``dtype``) or ``nf4``
    (bitsandbytes 4-bit weights, ``dtype`` as the compute dtype).
    """

    dtype: str
    device: str
    device_map: dict[str, int | str] | None = None
    max_memory: dict[int | str, int] | None = None
    quantization: str | None = None
    offload_folder: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {self.quantization!r} is not one of {QUANTIZATIONS}")

    @property
    def split(self) -> bool:
        return self.device_map is not None

    def describe(self) -> str:
        weights = f"nf4 weights ({self.dtype} compute)" if self.quantization else self.dtype
        where = "split over " + ", ".join(map(str, sorted(set(map(str, self.device_map.values()))))) \
            if self.device_map else self.device
        return f"{weights} on {where}"
