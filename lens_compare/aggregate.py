"""Per-layer aggregates (mean, std, min, max over tokens) of the per-token metrics."""

import math
from typing import Any

import einops
import torch
from jaxtyping import Bool
from torch import Tensor

from lens_compare.hooks import HOOK_KINDS
from lens_compare.metrics import METRIC_NAMES, STAT_NAMES, masked_stats
from lens_compare.per_token import TokenMetrics


def token_mask(
    real: Bool[Tensor, "prompt pos"], positions: str
) -> Bool[Tensor, "prompt pos"]:
    """Which tokens an aggregate covers: ``all`` real tokens, ``rest`` (position 0 excluded) or ``first``."""
    keep = real.clone()
    if positions == "rest":
        keep[:, 0] = False
    elif positions == "first":
        keep[:, 1:] = False
    elif positions != "all":
        raise ValueError(f"positions must be 'all', 'rest' or 'first', got {positions!r}")
    return keep


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def layer_records(
    metrics: TokenMetrics, layers: tuple[int, ...], mask: Bool[Tensor, "prompt pos"]
) -> dict[str, list[dict[str, Any]]]:
    """``{hook: [{"layer": l, metric: {"mean", "std", "min", "max"} | None, ...}]}`` over ``mask``.

    A metric that is undefined at a layer on every token (the depth metrics of the
    first captured layer) is ``None``; a NaN never reaches the output.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    flat_mask = einops.repeat(mask, "prompt pos -> layer (prompt pos)", layer=len(layers))
    for kind in HOOK_KINDS:
        stats = {}
        for name in METRIC_NAMES:
            flat = einops.rearrange(metrics[kind][name], "layer prompt pos -> layer (prompt pos)")
            # NaN marks an undefined value (no previous layer, a zero vector): left out.
            stats[name] = masked_stats(flat, flat_mask & ~torch.isnan(flat))
        records = []
        for row, layer in enumerate(layers):
            record: dict[str, Any] = {"layer": layer}
            for name in METRIC_NAMES:
                values = [_finite_or_none(v) for v in stats[name][row].tolist()]
                record[name] = None if all(v is None for v in values) else dict(zip(STAT_NAMES, values))
            records.append(record)
        out[kind] = records
    return out
