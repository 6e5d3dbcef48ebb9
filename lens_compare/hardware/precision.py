"""Weight bytes of a model in each precision the planner knows.

- ``float32``/``bfloat16``/``float16``: every parameter at that width.
- ``fp8``: e4m3 weights (1 byte) for linear and expert matrices, plus float32 scales:
  one per ``block`` tile (DeepSeek-V3's 128x128 ``weight_block_size``) or, with no
  block, one per output row (fbgemm per-channel, as Llama-3.1-405B-FP8). Embeddings,
  output head, norms and biases stay bfloat16, as in those checkpoints.
- ``router`` weights (DeepSeek's expert gate) are float32 in every precision:
  transformers keeps them so (``_keep_in_fp32_modules_strict``).
- ``nf4``: bitsandbytes 4-bit for every ``nn.Linear`` except the output head (that is
  transformers' default skip list): 0.5 byte per weight plus one float32 absmax per
  64-weight block, or with double quantisation one uint8 absmax per block and one
  float32 per 256 blocks. DeepSeek's fused expert tensors are not ``nn.Linear`` and
  stay unquantized, as do embeddings, norms and biases, in the load dtype
  (``nf4_unquantized_bytes``: 2 for a 16-bit run, 4 for float32).

>>> from lens_compare.models.architecture import architecture_from_config
from lens_compare.models.params import TensorGroup, count_params
>>> g = [TensorGroup("w", "linear", (128, 256))]
>>> weight_bytes(g, "nf4").total, 128 * 256 // 2 + (128 * 256 // 64) * 4
(18432, 18432)
"""

import math
from dataclasses import dataclass
from typing import Any

from lens_compare.errors import ConfigError
from lens_compare.models.architecture import architecture_from_config
from lens_compare.models.params import TensorGroup, count_params
from lens_compare.util.choices import DTYPE_BYTES
from lens_compare.util.units import gib

PRECISIONS: tuple[str, ...] = ("float32", "bfloat16", "float16", "fp8", "nf4")

NF4_BLOCK = 64
NF4_DOUBLE_QUANT_BLOCK = 256
_SIXTEEN_BIT = 2


@dataclass(frozen=True)
class WeightBytes:
    precision: str
    total: int
    # Quantisation constants (absmax, FP8 scales) included in ``total``.
    constants: int

    @property
    def gib(self) -> float:
        return gib(self.total)

    def to_dict(self) -> dict[str, Any]:
        return {"precision": self.precision, "gib": self.gib, "bytes": self.total,
                "constants_bytes": self.constants}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}"
        )
    return precision


def _fp8_scales(group: TensorGroup, block: tuple[int, int] | None) -> int:
    *lead, rows, cols = group.shape
    matrices = group.copies * math.prod(lead)
    tiles = math.ceil(rows / block[0]) * math.ceil(cols / block[1]) if block else rows
    return matrices * tiles * 4


def _nf4_constants(numel_per_tensor: int, copies: int, double_quant: bool) -> int:
    blocks = math.ceil(numel_per_tensor / NF4_BLOCK)
    if double_quant:
        return copies * (blocks + 4 * math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK))
    return copies * blocks * 4


def weight_bytes(
    groups: list[TensorGroup],
    precision: str,
    *,
    fp8_block: tuple[int, int] | None = (128, 128),
    nf4_double_quant: bool = False,
    nf4_unquantized_bytes: int = _SIXTEEN_BIT,
) -> WeightBytes:
    """Bytes the weights in ``groups`` occupy once loaded in ``precision``."""
    check_precision(precision)
    total = constants = 0
    for g in groups:
        if g.kind == "router":
            total += g.numel * 4
        elif precision in DTYPE_BYTES:
            total += g.numel * DTYPE_BYTES[precision]
        elif precision == "fp8" and g.kind in ("linear", "experts"):
            scales = _fp8_scales(g, fp8_block)
            total += g.numel + scales
            constants += scales
        elif precision == "nf4" and g.kind == "linear":
            per_tensor = g.numel // g.copies
            consts = _nf4_constants(per_tensor, g.copies, nf4_double_quant)
            total += g.copies * math.ceil(per_tensor / 2) + consts
            constants += consts
        elif precision == "nf4":
            total += g.numel * nf4_unquantized_bytes
        else:
            total += g.numel * _SIXTEEN_BIT
    return WeightBytes(precision, total, constants)


def model_weight_bytes(config: Any, dtype: str) -> int:
    """Bytes of a model's weights, from its config (a transformers config or a config.json dict),
    every parameter at ``dtype``'s width."""
    return count_params(architecture_from_config(config)).total * DTYPE_BYTES[dtype]


def floor_dtype(run_dtype: str) -> str:
    """The noise floor's second precision (``--noise-floor``): float32 for a 16-bit run, bfloat16 for
    a float32 one."""
    return "bfloat16" if run_dtype == "float32" else "float32"
