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

from lens_compare.capture import ResidualStates
from lens_compare.errors import CaptureError
from lens_compare.hooks import HOOK_KINDS, HookKind, state_index
from lens_compare.metrics import METRIC_NAMES, cross_model, depth_step

TokenMetrics = dict[HookKind, dict[str, Float[Tensor, "layer prompt pos"]]]
StateMetrics = dict[str, Float[Tensor, "state prompt pos"]]


def state_metrics(base: ResidualStates, sft: ResidualStates) -> StateMetrics:
    """Every metric once per captured residual state (what a run's shards store)."""
    if base.states != sft.states or base.values.shape != sft.values.shape:
        raise CaptureError(
            f"base and SFT captures do not line up: states {base.states} vs {sft.states}, "
            f"shapes {tuple(base.values.shape)} vs {tuple(sft.values.shape)}"
        )
    shape = base.values.shape[:3]
    out = {name: torch.full(shape, torch.nan) for name in METRIC_NAMES}
    for row, state in enumerate(base.states):
        cm = cross_model(base.values[row], sft.values[row])
        for name in ("cosine", "norm_delta", "norm_ratio", "relative_l2", "base_norm", "sft_norm"):
            out[name][row] = getattr(cm, name)
        if state - 1 in base.states:
            previous = base.states.index(state - 1)
            for model, states in (("base", base), ("sft", sft)):
                step = depth_step(states.values[previous], states.values[row])
                out[f"{model}_cosine_prev"][row] = step.cosine_prev
                out[f"{model}_norm_delta"][row] = step.norm_delta
    return out


def hook_metrics(per_state: StateMetrics, states: tuple[int, ...], layers: tuple[int, ...]) -> TokenMetrics:
    """``{hook: {metric: [layer, prompt, pos]}}`` for the captured ``layers`` (in that order),
    read out of per-state metrics through the hook views."""
    result: TokenMetrics = {}
    for kind in HOOK_KINDS:
        rows = [states.index(state_index(kind, layer)) for layer in layers]
        defined_prev = torch.tensor([layer - 1 in layers for layer in layers])
        metrics = {}
        for name, values in per_state.items():
            picked = values[rows]
            if name.endswith(("_cosine_prev", "_norm_delta")) and name.startswith(("base_", "sft_")):
                picked[~defined_prev] = torch.nan
            metrics[name] = picked
        result[kind] = metrics
    return result


def token_metrics(base: ResidualStates, sft: ResidualStates, layers: tuple[int, ...]) -> TokenMetrics:
    """``{hook: {metric: [layer, prompt, pos]}}`` straight from two models' captured states."""
    return hook_metrics(state_metrics(base, sft), base.states, layers)
