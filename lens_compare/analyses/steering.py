"""The steering check: how much of the fine-tune the difference lens's mean shift explains.

The base model runs again with α·δ_l added to its residual stream after block l (``resid_post``)
at every position, δ_l the difference lens's mean SFT-minus-base shift of that layer over the
``rest`` tokens. Over the ``rest`` tokens (every real token but position 0), each model's final
next-token distribution is compared with the SFT model's:

- ``kl_base`` = mean KL(p_sft ‖ p_base), ``kl_steered`` = mean KL(p_sft ‖ p_base+αδ) (natural log);
  ``fraction_kl`` = 1 - kl_steered / kl_base: 1 when steering turns the base model into the SFT
  one, 0 when it changes nothing the KL sees, negative when it moves away;
- ``top1_base``, ``top1_steered``: the share of tokens whose top-1 prediction is the SFT model's;
  ``fraction_top1`` = (top1_steered - top1_base) / (1 - top1_base);
- each fraction is None (JSON null) where it is undefined: no divergence to explain
  (``kl_base`` 0, ``top1_base`` 1), as when the two models agree exactly.

A shard gives sums (``steering_sums``: Σ KL and Σ agreement in float64, the token count), which add
up over shards (``add_sums`` of the difference lens), and ``steering_records`` divides the run's once.
Logits are compared in float32 over the ids both models share (the caller slices them).

>>> steering_records({"kl_base": torch.tensor(2.0, dtype=torch.float64), ...}, (1,), (1.0,), "run")  # doctest: +SKIP
[{'layer': 1, 'alpha': 1.0, 'kl_base': 0.5, 'kl_steered': 0.1, 'fraction_kl': 0.8, ...}]
"""

from dataclasses import dataclass
from typing import Any

import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

ALPHAS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Steering:
    """What the steering check does in a run: steer at ``layers`` (each a difference-lens layer) by
    each of ``alphas`` times that layer's δ over the ``rest`` tokens of the run's prompts, measured on
    them and on ``held_out_prompts`` more."""

    layers: tuple[int, ...]
    alphas: tuple[float, ...] = ALPHAS
    # Held-out prompts (``--steer-prompts``) the check is also measured on, with the run's δ; 0 for none.
    held_out_prompts: int = 0


@dataclass(frozen=True)
class Target:
    """The SFT model's next-token distribution over a batch, float32, worked out once for the many
    distributions the batch is compared with (the unsteered base model's, each steered one's)."""

    log_probs: Float[Tensor, "batch pos vocab"]
    probs: Float[Tensor, "batch pos vocab"]
    top1: Int[Tensor, "batch pos"]

    @classmethod
    def of(cls, logits: Float[Tensor, "batch pos vocab"]) -> "Target":
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return cls(log_probs, log_probs.exp(), log_probs.argmax(dim=-1))


def divergence_from(target: Target, logits: Float[Tensor, "batch pos vocab"],
                    mask: Bool[Tensor, "batch pos"]) -> tuple[Tensor, Tensor]:
    """Σ KL(p_sft ‖ p) and Σ [argmax p == argmax p_sft] over the ``mask`` tokens, float64 scalars
    (each token's in float32), p the distribution of ``logits``. Every position is computed and the
    mask applied to the per-token results: no copy of the masked logits, and log p_sft - log p is
    formed in place of log p.

    >>> logits = torch.randn(1, 3, 5)
    >>> [float(x) for x in divergence_from(Target.of(logits), logits, torch.ones(1, 3, dtype=torch.bool))]
    [0.0, 3.0]
    """
    gap = torch.log_softmax(logits.float(), dim=-1)
    top1 = gap.argmax(dim=-1)
    gap.neg_().add_(target.log_probs)
    kl = einsum(target.probs, gap, "batch pos vocab, batch pos vocab -> batch pos")
    mask = mask.to(kl.device)
    return kl[mask].double().sum().cpu(), (top1 == target.top1)[mask].double().sum().cpu()


def steering_records(sums: dict[str, Tensor], layers: tuple[int, ...], alphas: tuple[float, ...],
                     prompts: str) -> list[dict[str, Any]]:
    """The records of a run's summed ``sums`` (``kl_base``, ``top1_base`` scalars, ``kl`` and ``top1``
    [layer, alpha], ``count``): one per layer and α, in that order, each with its layer's
    ``best_alpha`` (the α whose ``fraction_kl`` is largest)."""
    count = float(sums["count"])
    if count == 0:
        return []
    kl_base = float(sums["kl_base"]) / count
    top1_base = float(sums["top1_base"]) / count
    records = []
    for row, layer in enumerate(layers):
        found = []
        for column, alpha in enumerate(alphas):
            kl = float(sums["kl"][row, column]) / count
            top1 = float(sums["top1"][row, column]) / count
            found.append({
                "layer": layer, "alpha": alpha, "prompts": prompts, "n_tokens": int(count),
                "kl_base": kl_base, "kl_steered": kl,
                "fraction_kl": 1.0 - kl / kl_base if kl_base > 0 else None,
                "top1_base": top1_base, "top1_steered": top1,
                "fraction_top1": (top1 - top1_base) / (1.0 - top1_base) if top1_base < 1 else None,
            })
        scored = [record for record in found if record["fraction_kl"] is not None]
        best = max(scored, key=lambda record: record["fraction_kl"])["alpha"] if scored else None
        records.extend({**record, "best_alpha": best} for record in found)
    return records
