"""Per-layer aggregates (mean with its bootstrap interval, std, min, max over tokens) of the
per-token metrics."""

import math
from typing import Any

import einops
import torch
from jaxtyping import Bool
from torch import Tensor

from lens_compare.bootstrap import Bootstrap, interval
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
    metrics: TokenMetrics, layers: tuple[int, ...], mask: Bool[Tensor, "prompt pos"],
    bootstrap: Bootstrap | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``{hook: [{"layer": l, metric: {"mean", "ci_low", "ci_high", "std", "min", "max"} | None}]}``
    over ``mask``; ``ci_low``/``ci_high`` (the bootstrap interval of the mean,
    ``lens_compare.bootstrap``) only with ``bootstrap`` and resamples > 0.

    A metric that is undefined at a layer on every token (the depth metrics of the
    first captured layer) is ``None``; a NaN never reaches the output.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    flat_mask = einops.repeat(mask, "prompt pos -> layer (prompt pos)", layer=len(layers))
    with_ci = bootstrap is not None and bootstrap.resamples > 0
    for kind in HOOK_KINDS:
        stats, bounds = {}, {}
        for name in METRIC_NAMES:
            values = metrics[kind][name]
            flat = einops.rearrange(values, "layer prompt pos -> layer (prompt pos)")
            # NaN marks an undefined value (no previous layer, a zero vector): left out.
            stats[name] = masked_stats(flat, flat_mask & ~torch.isnan(flat))
            if with_ci:
                defined = einops.repeat(mask, "prompt pos -> layer prompt pos", layer=len(layers)) & ~torch.isnan(values)
                bounds[name] = interval(values, defined, bootstrap)
        records = []
        for row, layer in enumerate(layers):
            record: dict[str, Any] = {"layer": layer}
            for name in METRIC_NAMES:
                values = dict(zip(STAT_NAMES, (_finite_or_none(v) for v in stats[name][row].tolist())))
                if all(v is None for v in values.values()):
                    record[name] = None
                    continue
                if with_ci:
                    low, high = bounds[name]
                    values = {"mean": values["mean"], "ci_low": _finite_or_none(float(low[row])),
                              "ci_high": _finite_or_none(float(high[row])),
                              **{k: v for k, v in values.items() if k != "mean"}}
                record[name] = values
            records.append(record)
        out[kind] = records
    return out
