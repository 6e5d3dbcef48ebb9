"""Dequantize native FP8 checkpoints (DeepSeek-V3 block-wise, fbgemm row-wise) tensor by tensor.

Two layouts exist in the wild, named by the checkpoint's ``quantization_config.quant_method``:

- ``fp8`` (DeepSeek-V3/V3.1, transformers' ``FineGrainedFP8Config``): each ``*.weight`` is
  ``float8_e4m3fn`` with a float32 ``*.weight_scale_inv`` of one scale per
  ``weight_block_size`` block (128 x 128). The grid has ceil(rows / 128) x ceil(cols / 128)
  entries: the last block row and column are partial when a dimension is not a multiple of
  128 (DeepSeek-V3's ``kv_a_proj_with_mqa`` has 576 rows, a 5-row grid). Each scale is
  expanded over its block and the expansion cropped to the weight's shape. (transformers
  5.24 instead derives the block size from the grid: it raises on 576 rows and is silently
  wrong where the division happens to be exact.)
- ``fbgemm_fp8`` (Llama-3.1-405B-FP8): one float32 ``*.weight_scale`` per output row,
  shape ``[rows, 1]``; ``*.input_scale_ub`` is the activation clamp of fbgemm's kernel and
  has no role in the dequantized weight.

In both, weight = fp8 value x scale, computed in float32 and then cast to the run's dtype,
a chunk of rows at a time (``CHUNK_ELEMENTS``).

>>> import torch
>>> w = torch.ones(130, 3).to(torch.float8_e4m3fn)
>>> dequantize_blockwise(w, torch.tensor([[2.0], [3.0]]), (128, 128), torch.float32)[127:, 0]
tensor([2., 3., 3.])
"""

import math
from dataclasses import dataclass
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from lens_compare.errors import CheckpointError
from lens_compare.util.units import FP8_CHUNK_ELEMENTS

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# Elements per dequantization chunk: three float32 temporaries of this size (16 MiB each).
CHUNK_ELEMENTS = FP8_CHUNK_ELEMENTS


@dataclass(frozen=True)
class Fp8Layout:
    """Where an FP8 checkpoint keeps each weight's scales, and how they apply."""

    scale_suffix: str
    granularity: Literal["block", "row"]
    # Tensors of the format that are not weights of the model (dropped when read).
    auxiliary_suffixes: tuple[str, ...] = ()


FP8_LAYOUTS: dict[str, Fp8Layout] = {
    "fp8": Fp8Layout("weight_scale_inv", "block"),
    "fbgemm_fp8": Fp8Layout("weight_scale", "row", auxiliary_suffixes=("input_scale_ub",)),
}


def fp8_layout(quantization_config: dict[str, Any] | None) -> tuple[Fp8Layout, tuple[int, int]] | None:
    """The FP8 layout and block size a checkpoint's ``quantization_config`` declares, or None when
    the checkpoint is not FP8. Other quantization methods are refused: they cannot stream."""
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method not in FP8_LAYOUTS:
        raise CheckpointError(
            f"checkpoint is quantized with {method!r}, which streaming cannot read; supported: "
            f"unquantized safetensors and native FP8 ({', '.join(FP8_LAYOUTS)})"
        )
    block = tuple(quantization_config.get("weight_block_size") or (128, 128))
    if len(block) != 2 or min(block) < 1:
        raise CheckpointError(f"FP8 weight_block_size {block} is not [rows, cols]")
    return FP8_LAYOUTS[method], (int(block[0]), int(block[1]))


def scale_name(weight_name: str, layout: Fp8Layout) -> str:
    """``model.layers.0.mlp.down_proj.weight`` -> ``model.layers.0.mlp.down_proj.weight_scale_inv``."""
    return weight_name.removesuffix("weight") + layout.scale_suffix


def expected_scale_shape(weight_shape: tuple[int, ...], layout: Fp8Layout, block: tuple[int, int]) -> tuple[int, ...]:
    rows, cols = weight_shape
    if layout.granularity == "row":
        return (rows, 1)
    return (math.ceil(rows / block[0]), math.ceil(cols / block[1]))


def dequantize_blockwise(
    weight: Float[Tensor, "rows cols"],
    scale_inv: Float[Tensor, "row_blocks col_blocks"],
    block: tuple[int, int],
    dtype: torch.dtype,
) -> Float[Tensor, "rows cols"]:
    """``weight x scale``, each scale covering one ``block`` (the last ones cropped)."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale_inv.shape) != grid:
        raise CheckpointError(
            f"FP8 scale grid {tuple(scale_inv.shape)} does not match a {rows} x {cols} weight in "
            f"{block[0]} x {block[1]} blocks: expected {grid}"
        )
    out = torch.empty((rows, cols), dtype=dtype, device=weight.device)
    step = _chunk_rows(cols, block[0])
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        grid_rows = scale_inv[start // block[0]: -(-stop // block[0])].float()
        scales = einops.repeat(grid_rows, "gr gc -> (gr br) (gc bc)", br=block[0], bc=block[1])
        out[start:stop] = weight[start:stop].float() * scales[: stop - start, :cols]
    return out


def dequantize_rowwise(
    weight: Float[Tensor, "rows cols"], scale: Float[Tensor, "rows one"], dtype: torch.dtype
) -> Float[Tensor, "rows cols"]:
    """``weight x scale`` with one scale per output row."""
    if tuple(scale.shape) != (weight.shape[0], 1):
        raise CheckpointError(
            f"FP8 row-wise scale of shape {tuple(scale.shape)} does not match a weight with "
            f"{weight.shape[0]} rows: expected ({weight.shape[0]}, 1)"
        )
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    step = _chunk_rows(weight.shape[1], 1)
    for start in range(0, weight.shape[0], step):
        out[start:start + step] = weight[start:start + step].float() * scale[start:start + step].float()
    return out


def _chunk_rows(cols: int, multiple: int) -> int:
    """Rows per dequantization chunk: a multiple of ``multiple`` keeping the float32
    temporaries near ``CHUNK_ELEMENTS`` (so dequantizing never doubles a tensor's memory)."""
    rows = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return max(multiple, rows - rows % multiple)


def dequantize(weight: Tensor, scale: Tensor, layout: Fp8Layout, block: tuple[int, int], dtype: torch.dtype) -> Tensor:
    if layout.granularity == "block":
        return dequantize_blockwise(weight, scale, block, dtype)
    return dequantize_rowwise(weight, scale, dtype)
