"""The steering check in the store: each shard's sums, once the difference lens's δ is known.

δ_l is the run's mean SFT-minus-base ``resid_post`` shift over the ``rest`` tokens, so it exists
only once every shard's difference-lens sums are in. After every engine call
(``Comparison.run_shards``), whichever call finds them all computes the steering sums of every
shard that lacks them (``steering_due``, ``run_steering``): shards run by several processes into
one run folder get their steering from the one that completes δ, and a resumed run computes only
the shards it lacks. It loads both models at once (as ``resident`` does) through
TransformerBridge; per batch: the SFT model once, the base model once unsteered, and the base
model once per (layer, α) with a hook on ``blocks.{l}.hook_resid_post`` adding α·δ_l at every
position. The ``stream`` engine has no such hook, so the run refuses ``--steer`` there.
"""

import logging

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.analyses.difference_lens import add_sums
from lens_compare.analyses.steering import Steering, token_divergence
from lens_compare.engines.bridge import loaded
from lens_compare.engines.job import Job
from lens_compare.engines.store import Kind, Store
from lens_compare.metrics.aggregate import token_mask
from lens_compare.util.hooks import resid_post

logger = logging.getLogger("lens_compare")


def deltas(job: Job, store: Store) -> Float[Tensor, "layer d_model"]:
    """δ of each steered layer over the ``rest`` tokens, float32, from every shard's sums."""
    lens = job.difference
    sums = add_sums({key: value for key, value in store.get(Kind.DIFFERENCE, shard=shard).items()
                     if key in ("difference", "count")} for shard in range(job.layout.count))
    rest = lens.positions.index("rest")
    rows = [lens.layers.index(layer) for layer in job.steering.layers]
    return (sums["difference"][rows, rest] / sums["count"][rest].double()).float()


def missing(job: Job, store: Store) -> list[int]:
    """The shards whose steering sums ``store`` lacks (none without the check)."""
    if job.steering is None:
        return []
    return [shard for shard in range(job.layout.count) if not store.has(Kind.STEERING, shard=shard)]


def steering_due(job: Job, store: Store) -> bool:
    """Whether δ is known (every shard's difference-lens sums are in) and some shard lacks its steering sums."""
    return bool(missing(job, store)) and all(store.has(Kind.DIFFERENCE, shard=shard)
                                             for shard in range(job.layout.count))


def _logits(bridge, token_ids: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"], vocab: int,
            hooks: list) -> Float[Tensor, "batch pos vocab"]:
    device = torch.device(bridge.cfg.device)
    logits = bridge.run_with_hooks(token_ids.to(device), fwd_hooks=hooks, return_type="logits",
                                   attention_mask=real.long().to(device))
    return logits[..., :vocab]


def shard_steering(job: Job, shard: int, base_bridge, sft_bridge, delta: Float[Tensor, "layer d_model"],
                   steering: Steering, vocab: int) -> dict[str, Tensor]:
    """A shard's steering sums (``lens_compare.analyses.steering``) over its ``rest`` tokens."""
    token_ids, real = job.shard_inputs(shard)
    kl = torch.zeros((len(steering.layers), len(steering.alphas)), dtype=torch.float64)
    top1 = torch.zeros_like(kl)
    kl_base = torch.zeros((), dtype=torch.float64)
    top1_base = torch.zeros_like(kl_base)
    with torch.inference_mode():
        for start in range(0, token_ids.shape[0], job.batch_size):
            batch_real = real[start:start + job.batch_size]
            width = int(batch_real.sum(dim=1).max())
            ids, batch_real = token_ids[start:start + job.batch_size, :width], batch_real[:, :width]
            mask = token_mask(batch_real, "rest")
            sft = _logits(sft_bridge, ids, batch_real, vocab, [])
            mask = mask.to(sft.device)
            found = token_divergence(sft, _logits(base_bridge, ids, batch_real, vocab, []), mask)
            kl_base += found[0]
            top1_base += found[1]
            for row, layer in enumerate(steering.layers):
                for column, alpha in enumerate(steering.alphas):
                    def add(resid, hook, shift=alpha * delta[row]):
                        # The stream's own dtype, not a parameter's (an NF4 model's weights are uint8).
                        return resid + shift.to(device=resid.device, dtype=resid.dtype)

                    steered = _logits(base_bridge, ids, batch_real, vocab, [(resid_post(layer), add)])
                    found = token_divergence(sft, steered, mask)
                    kl[row, column] += found[0]
                    top1[row, column] += found[1]
    count = token_mask(real, "rest").sum().double()
    return {"kl_base": kl_base, "top1_base": top1_base, "kl": kl, "top1": top1, "count": count}


def run_steering(job: Job, store: Store) -> None:
    """Every missing shard's steering sums, both models loaded once for them all."""
    shards = missing(job, store)
    delta = deltas(job, store)
    base_side, sft_side = job.sides
    logger.info("steering check: %d shard(s), %d layer(s) x %d alpha(s)", len(shards), len(job.steering.layers),
                len(job.steering.alphas))
    with loaded(job, base_side, store) as base, loaded(job, sft_side, store) as sft:
        vocab = job.lens_vocab or min(base.bridge.cfg.d_vocab, sft.bridge.cfg.d_vocab)
        for shard in shards:
            store.put(Kind.STEERING, shard_steering(job, shard, base.bridge, sft.bridge, delta, job.steering, vocab),
                      shard=shard)
