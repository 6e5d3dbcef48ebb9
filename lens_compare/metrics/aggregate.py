"""Per-layer aggregates (mean with its bootstrap interval, std, min, max over tokens) of the
per-token metrics."""

import math
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_compare.metrics.bootstrap import Bootstrap, interval
from lens_compare.metrics.per_token import TokenMetrics
from lens_compare.metrics.residual import METRIC_NAMES, STAT_NAMES, masked_stats
from lens_compare.util.hooks import HOOK_KINDS


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


def aggregated_positions(include_first_token: bool) -> str:
    """The ``token_mask`` positions the per-layer aggregates count: every real token with
    ``include_first_token``, else all but position 0 (the attention sink, reported on its own as ``first``).

    >>> aggregated_positions(False)
    'rest'
    """
    return "all" if include_first_token else "rest"


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def layer_stats(
    values: Float[Tensor, "layer prompt pos"], mask: Bool[Tensor, "prompt pos"], bootstrap: Bootstrap | None = None,
) -> list[dict[str, float | None] | None]:
    """Per layer: ``{"mean", "ci_low", "ci_high", "std", "min", "max"}`` of ``values`` over ``mask``
    (``ci_low``/``ci_high``, the bootstrap interval of the mean, only with ``bootstrap`` and
    resamples > 0), or None where the value is undefined (NaN) on every selected token."""
    n_layers = values.shape[0]
    flat = einops.rearrange(values, "layer prompt pos -> layer (prompt pos)")
    flat_mask = einops.repeat(mask, "prompt pos -> layer (prompt pos)", layer=n_layers)
    # NaN marks an undefined value (no previous layer, a zero vector): left out.
    stats = masked_stats(flat, flat_mask & ~torch.isnan(flat))
    with_ci = bootstrap is not None and bootstrap.resamples > 0
    if with_ci:
        defined = einops.repeat(mask, "prompt pos -> layer prompt pos", layer=n_layers) & ~torch.isnan(values)
        low, high = interval(values, defined, bootstrap)
    out: list[dict[str, float | None] | None] = []
    for row in range(n_layers):
        found = dict(zip(STAT_NAMES, (_finite_or_none(v) for v in stats[row].tolist()), strict=True))
        if all(v is None for v in found.values()):
            out.append(None)
            continue
        if with_ci:
            found = {"mean": found["mean"], "ci_low": _finite_or_none(float(low[row])),
                     "ci_high": _finite_or_none(float(high[row])),
                     **{k: v for k, v in found.items() if k != "mean"}}
        out.append(found)
    return out


def layer_records(
    metrics: TokenMetrics, layers: tuple[int, ...], mask: Bool[Tensor, "prompt pos"],
    bootstrap: Bootstrap | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """``{hook: [{"layer": l, metric: {"mean", "ci_low", "ci_high", "std", "min", "max"} | None}]}``
    over ``mask`` (see ``layer_stats``).

    A metric that is undefined at a layer on every token (the depth metrics of the
    first captured layer) is ``None``; a NaN never reaches the output.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for kind in HOOK_KINDS:
        stats = {name: layer_stats(metrics[kind][name], mask, bootstrap) for name in METRIC_NAMES}
        out[kind] = [{"layer": layer, **{name: stats[name][row] for name in METRIC_NAMES}}
                     for row, layer in enumerate(layers)]
    return out


def analysis_records(
    values: dict[str, Float[Tensor, "layer prompt pos"]], layers: tuple[int, ...], mask: Bool[Tensor, "prompt pos"],
    bootstrap: Bootstrap | None = None,
) -> list[dict[str, Any]]:
    """One record per layer of an analysis's per-token ``values``; a dotted key nests
    (``attn_out.cosine`` -> ``record["attn_out"]["cosine"]``)."""
    records: list[dict[str, Any]] = [{"layer": layer} for layer in layers]
    for key, tensor in values.items():
        for record, stats in zip(records, layer_stats(tensor, mask, bootstrap), strict=True):
            outer, _, inner = key.partition(".")
            if inner:
                record.setdefault(outer, {})[inner] = stats
            else:
                record[outer] = stats
    return records


def largest_tokens(
    values: Float[Tensor, "layer prompt pos"], mask: Bool[Tensor, "prompt pos"], k: int
) -> list[list[tuple[int, int, float]]]:
    """Per layer, ``(prompt, position, value)`` of the ``k`` largest values over ``mask``, largest
    first (NaN never picked; fewer than ``k`` when fewer tokens are defined)."""
    out = []
    for layer_values in values:
        picked = torch.where(mask & ~torch.isnan(layer_values), layer_values.double(), -torch.inf)
        flat = einops.rearrange(picked, "prompt pos -> (prompt pos)")
        top = torch.topk(flat, min(k, flat.numel()))
        width = picked.shape[1]
        out.append([(int(index) // width, int(index) % width, float(value))
                    for value, index in zip(top.values, top.indices, strict=True) if math.isfinite(value)])
    return out
