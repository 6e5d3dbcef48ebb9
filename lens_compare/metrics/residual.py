"""Per-token residual-stream metrics, as pure functions.

Everything here is computed in float32 (the inputs may be bfloat16 or float16),
reducing over ``d_model`` with einops. Nothing here knows about models, hooks or
files: inputs are tensors whose last axis is ``d_model``.

>>> import torch
>>> a = torch.tensor([[3.0, 4.0]]); b = torch.tensor([[6.0, 8.0]])
>>> cosine(a, b), l2_norm(a), relative_l2(a, b)
(tensor([1.]), tensor([5.]), tensor([1.]))
"""

from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

CROSS_MODEL_METRICS = ("cosine", "norm_delta", "norm_ratio", "relative_l2")
METRIC_NAMES = (
    *CROSS_MODEL_METRICS,
    "base_cosine_prev",
    "sft_cosine_prev",
    "base_norm_delta",
    "sft_norm_delta",
    "base_norm",
    "sft_norm",
)
STAT_NAMES = ("mean", "std", "min", "max")


def squared_norm(x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
    """Sum of squares over ``d_model``, in float32."""
    return einops.reduce(x.float().square(), "... d_model -> ...", "sum")


def l2_norm(x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
    """Euclidean norm over ``d_model``, in float32."""
    return torch.sqrt(squared_norm(x))


def dot(a: Float[Tensor, "*batch d_model"], b: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
    return einops.reduce(a.float() * b.float(), "... d_model -> ...", "sum")


def cosine_from_sums(
    ab: Float[Tensor, "*batch"], aa: Float[Tensor, "*batch"], bb: Float[Tensor, "*batch"]
) -> Float[Tensor, "*batch"]:
    """``ab / sqrt(aa * bb)`` from float32 sums, combined in float64 and kept in [-1, 1].

    For a == b the three sums are the same float32 number s; s * s and its square root
    are exact in float64, so the cosine is exactly 1 (``ab / (|a| |b|)`` in float32 gives
    1.0000001). Rounding elsewhere is clipped to [-1, 1]. A zero vector gives NaN.
    """
    return (ab.double() / torch.sqrt(aa.double() * bb.double())).clamp(-1.0, 1.0).float()


def cosine(a: Float[Tensor, "*batch d_model"], b: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
    """cos(a, b), in [-1, 1]. A zero vector gives NaN (undefined), never a made-up 0."""
    return cosine_from_sums(dot(a, b), squared_norm(a), squared_norm(b))


def relative_l2(
    base: Float[Tensor, "*batch d_model"], sft: Float[Tensor, "*batch d_model"]
) -> Float[Tensor, "*batch"]:
    """||sft - base|| / ||base||."""
    return l2_norm(sft.float() - base.float()) / l2_norm(base)


@dataclass(frozen=True)
class CrossModel:
    """Base-vs-SFT metrics for the same tokens at the same residual state."""

    cosine: Float[Tensor, "*batch"]
    norm_delta: Float[Tensor, "*batch"]
    norm_ratio: Float[Tensor, "*batch"]
    relative_l2: Float[Tensor, "*batch"]
    base_norm: Float[Tensor, "*batch"]
    sft_norm: Float[Tensor, "*batch"]


def cross_model(
    base: Float[Tensor, "*batch d_model"], sft: Float[Tensor, "*batch d_model"]
) -> CrossModel:
    base32, sft32 = base.float(), sft.float()
    base_sq, sft_sq = squared_norm(base32), squared_norm(sft32)
    base_norm, sft_norm = torch.sqrt(base_sq), torch.sqrt(sft_sq)
    return CrossModel(
        cosine=cosine_from_sums(dot(base32, sft32), base_sq, sft_sq),
        norm_delta=sft_norm - base_norm,
        norm_ratio=sft_norm / base_norm,
        relative_l2=l2_norm(sft32 - base32) / base_norm,
        base_norm=base_norm,
        sft_norm=sft_norm,
    )


@dataclass(frozen=True)
class DepthStep:
    """How one model's stream changed from the previous layer to this one."""

    cosine_prev: Float[Tensor, "*batch"]
    norm_delta: Float[Tensor, "*batch"]


def depth_step(
    previous: Float[Tensor, "*batch d_model"], current: Float[Tensor, "*batch d_model"]
) -> DepthStep:
    return DepthStep(
        cosine_prev=cosine(current, previous),
        norm_delta=l2_norm(current) - l2_norm(previous),
    )


def masked_stats(
    values: Float[Tensor, "row token"], mask: Bool[Tensor, "row token"]
) -> Float[Tensor, "row 4"]:
    """mean, std (population, ddof=0), min, max of each row over the tokens where ``mask``.

    Accumulated in float64. A row with no selected token gives NaN for every
    statistic; the report turns that into null.
    """
    v = values.double()
    weight = mask.double()
    count = einops.reduce(weight, "row token -> row", "sum")
    total = einops.reduce(torch.where(mask, v, 0.0), "row token -> row", "sum")
    mean = total / count
    centred = torch.where(mask, v - einops.rearrange(mean, "row -> row 1"), 0.0)
    std = torch.sqrt(einops.reduce(centred.square(), "row token -> row", "sum") / count)
    low = einops.reduce(torch.where(mask, v, torch.inf), "row token -> row", "min")
    high = einops.reduce(torch.where(mask, v, -torch.inf), "row token -> row", "max")
    empty = count == 0
    low = torch.where(empty, torch.nan, low)
    high = torch.where(empty, torch.nan, high)
    return einops.rearrange([mean, std, low, high], "stat row -> row stat")
