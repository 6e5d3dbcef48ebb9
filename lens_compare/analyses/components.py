"""Sublayer attribution: how each block's attention and MLP writes differ between the models.

A block adds two things to the residual stream: its attention output (``attn_out``) and
its MLP output (``mlp_out``). Comparing these writes, rather than the stream they are
added to, says which sublayer fine-tuning changed: the stream carries every earlier
block's change, a write only its own sublayer's (given its input).

Per token: the base-vs-SFT ``cosine``, ``relative_l2`` (||sft - base|| / ||base||) and
both models' ``norm``, in float32 (``lens_compare.metrics.residual.cross_model``).
"""

import torch
from jaxtyping import Float
from torch import Tensor

from lens_compare.errors import CaptureError
from lens_compare.metrics.residual import cross_model
from lens_compare.metrics.states import ResidualStates
from lens_compare.util.hooks import COMPONENTS

# Per-token values of one component, in the JSON's order.
COMPONENT_METRICS = ("cosine", "relative_l2", "base_norm", "sft_norm")
# Keys in a shard's per-token metrics: "attn_out.cosine", ..., each [layer, prompt, pos].
COMPONENT_KEYS = tuple(f"{component}.{metric}" for component in COMPONENTS for metric in COMPONENT_METRICS)


def block_component_metrics(
    base: Float[Tensor, "component prompt pos d_model"], sft: Float[Tensor, "component prompt pos d_model"]
) -> dict[str, Float[Tensor, "prompt pos"]]:
    """Every component metric of one block (``COMPONENT_KEYS`` -> [prompt, pos])."""
    out = {}
    for index, component in enumerate(COMPONENTS):
        compared = cross_model(base[index], sft[index])
        for metric in COMPONENT_METRICS:
            out[f"{component}.{metric}"] = getattr(compared, metric)
    return out


def component_metrics(base: ResidualStates, sft: ResidualStates) -> dict[str, Float[Tensor, "layer prompt pos"]]:
    """``COMPONENT_KEYS`` -> [layer, prompt, pos] over the captured component layers (empty: none)."""
    if base.components is None and sft.components is None:
        return {}
    if base.component_layers != sft.component_layers or base.components.shape != sft.components.shape:
        raise CaptureError(
            f"base and SFT sublayer captures do not line up: layers {base.component_layers} vs "
            f"{sft.component_layers}"
        )
    rows = [block_component_metrics(b, s) for b, s in zip(base.components, sft.components, strict=True)]
    return stack_rows(rows, COMPONENT_KEYS)


def stack_rows(rows: list[dict[str, Tensor]], keys: tuple[str, ...]) -> dict[str, Tensor]:
    """Per-layer rows ``{key: [prompt, pos]}`` -> ``{key: [layer, prompt, pos]}``."""
    return {key: torch.stack([row[key] for row in rows]) for key in keys}
