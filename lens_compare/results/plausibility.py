"""What published base-vs-chat comparisons report, and warnings when a run looks implausible.

A base model and its chat/instruct sibling of one family share most of their residual
stream: that is why sparse autoencoders trained on one reconstruct the other. A run whose
streams are far apart already in the first blocks, or through the middle of the model,
is more often a tokenization or loading error (a different checkpoint, a chat template
applied to one side only, a wrong dtype) than a finding. ``PUBLISHED_RANGES`` lists the
reports with their sources; ``plausibility_warnings`` checks a result against them.
"""

from dataclasses import dataclass
from typing import Any

KISSANE_2024 = ("Kissane, Krzyzanowski, Conmy, Nanda (2024), \"SAEs (usually) Transfer Between Base and Chat "
                "Models\", AI Alignment Forum, https://www.alignmentforum.org/posts/fmwk6qxrpW8d4jvbd")


@dataclass(frozen=True)
class PublishedRange:
    """A reported range of one per-layer mean, and where in the model it applies."""

    name: str
    finding: str
    source: str
    metric: str
    # Which layers: "first" (the first captured layer after block 0, i.e. layer >= 1) or "middle"
    # (the captured layers in the middle third of the model).
    where: str
    # The mean of ``metric`` on ``resid_post`` below which the run is flagged.
    below: float


PUBLISHED_RANGES: tuple[PublishedRange, ...] = (
    PublishedRange(
        "early_layers",
        "base and chat models of one family start from the same embeddings and early blocks; their "
        "streams after the first blocks stay nearly parallel (SAEs trained on one model's residual stream "
        "reconstruct the other's)",
        KISSANE_2024, "cosine", "first", 0.5,
    ),
    PublishedRange(
        "middle_layers",
        "middle-layer residual streams of base and chat models (Mistral-7B, Qwen1.5-0.5B) are close enough "
        "that a base-model SAE spliced into the chat model gives about the chat SAE's loss; the exception "
        "reported is Gemma v1 2B, whose chat weights moved unusually far",
        KISSANE_2024, "cosine", "middle", 0.5,
    ),
)


def _layers_for(where: str, layers: list[int], n_layers: int) -> list[int]:
    if where == "first":
        later = [layer for layer in layers if layer >= 1]
        return later[:1]
    third = n_layers / 3
    return [layer for layer in layers if third <= layer < 2 * third]


def plausibility_warnings(records: list[dict[str, Any]], n_layers: int, same_family: bool) -> list[str]:
    """Warnings for the ``resid_post`` per-layer ``records`` of a run (empty: nothing implausible).
    Only a pair of one family (the same ``model_type``) is held to the published ranges."""
    if not same_family:
        return []
    by_layer = {record["layer"]: record for record in records}
    out = []
    for published in PUBLISHED_RANGES:
        flagged = []
        for layer in _layers_for(published.where, sorted(by_layer), n_layers):
            stats = by_layer[layer].get(published.metric)
            if stats is not None and stats["mean"] is not None and stats["mean"] < published.below:
                flagged.append((layer, stats["mean"]))
        if flagged:
            shown = ", ".join(f"layer {layer}: {value:.3f}" for layer, value in flagged)
            out.append(
                f"implausible for a base/chat pair of one family: resid_post mean {published.metric} below "
                f"{published.below} ({shown}). Published: {published.finding} [{published.source}]. This usually "
                "means a loading or tokenization error: check that both references are the intended checkpoints, "
                "that both models get the same prompt format (--chat-template), and the dtype"
            )
    return out
