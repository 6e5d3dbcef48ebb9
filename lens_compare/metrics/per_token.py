"""Every metric at every (hook, layer, prompt, position), from two models' captured states.

Metrics are computed once per distinct residual state and then read out through
the hook views, so ``resid_post`` of layer l and ``resid_pre`` of layer l+1 share
one computation. A depth metric (``*_cosine_prev``, ``*_norm_delta``) at layer l
compares with the same hook at layer l-1 and is NaN (reported as null) when
layer l-1 was not captured: always for the first captured layer.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from lens_compare.errors import CaptureError
from lens_compare.metrics.residual import METRIC_NAMES, cross_model, depth_step
from lens_compare.metrics.states import ResidualStates
from lens_compare.util.hooks import HOOK_KINDS, HookKind, state_index

TokenMetrics = dict[HookKind, dict[str, Float[Tensor, "layer prompt pos"]]]
StateMetrics = dict[str, Float[Tensor, "state prompt pos"]]


def one_state_metrics(
    base: Float[Tensor, "prompt pos d_model"],
    sft: Float[Tensor, "prompt pos d_model"],
    previous: tuple[Float[Tensor, "prompt pos d_model"], Float[Tensor, "prompt pos d_model"]] | None,
) -> dict[str, Float[Tensor, "prompt pos"]]:
    """Every metric of one residual state; the depth metrics need the state before it
    (``previous`` = base's and SFT's) and are NaN without it."""
    cm = cross_model(base, sft)
    out = {name: getattr(cm, name) for name in ("cosine", "norm_delta", "norm_ratio", "relative_l2",
                                                 "base_norm", "sft_norm")}
    for model, current, before in (("base", base, previous and previous[0]), ("sft", sft, previous and previous[1])):
        if before is None:
            out[f"{model}_cosine_prev"] = torch.full(base.shape[:2], torch.nan)
            out[f"{model}_norm_delta"] = torch.full(base.shape[:2], torch.nan)
        else:
            step = depth_step(before, current)
            out[f"{model}_cosine_prev"] = step.cosine_prev
            out[f"{model}_norm_delta"] = step.norm_delta
    return {name: out[name] for name in METRIC_NAMES}


def state_metrics(base: ResidualStates, sft: ResidualStates) -> StateMetrics:
    """Every metric once per captured residual state (what a run's shards store)."""
    if base.states != sft.states or base.values.shape != sft.values.shape:
        raise CaptureError(
            f"base and SFT captures do not line up: states {base.states} vs {sft.states}, "
            f"shapes {tuple(base.values.shape)} vs {tuple(sft.values.shape)}"
        )
    rows = []
    for row, state in enumerate(base.states):
        previous = None
        if state - 1 in base.states:
            before = base.states.index(state - 1)
            previous = (base.values[before], sft.values[before])
        rows.append(one_state_metrics(base.values[row], sft.values[row], previous))
    return stack_state_rows(rows)


def stack_state_rows(rows: list[dict[str, Float[Tensor, "prompt pos"]]]) -> StateMetrics:
    """Per-state metric rows -> ``{metric: [state, prompt, pos]}``."""
    return {name: torch.stack([row[name] for row in rows]) for name in METRIC_NAMES}


def hook_metrics(per_state: StateMetrics, states: tuple[int, ...], layers: tuple[int, ...]) -> TokenMetrics:
    """``{hook: {metric: [layer, prompt, pos]}}`` for the captured ``layers`` (in that order),
    read out of per-state metrics through the hook views."""
    result: TokenMetrics = {}
    for kind in HOOK_KINDS:
        rows = [states.index(state_index(kind, layer)) for layer in layers]
        defined_prev = torch.tensor([layer - 1 in layers for layer in layers])
        metrics = {}
        for name in METRIC_NAMES:  # a shard's metrics also hold the analyses' [layer, ...] values
            picked = per_state[name][rows]
            if name.endswith(("_cosine_prev", "_norm_delta")) and name.startswith(("base_", "sft_")):
                picked[~defined_prev] = torch.nan
            metrics[name] = picked
        result[kind] = metrics
    return result


def token_metrics(base: ResidualStates, sft: ResidualStates, layers: tuple[int, ...]) -> TokenMetrics:
    """``{hook: {metric: [layer, prompt, pos]}}`` straight from two models' captured states."""
    return hook_metrics(state_metrics(base, sft), base.states, layers)
