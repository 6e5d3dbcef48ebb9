"""The steering check in the store: each unit's sums, once the difference lens's δ is known.

δ_l is the run's mean SFT-minus-base ``resid_post`` shift over the ``rest`` tokens, so it exists
only once every shard's difference-lens sums are in. The check's units are the run's shards, then
the held-out prompts (``--steer-prompts``) as one more (``Job.steering_units``). Per batch of a unit:
the SFT model's next-token logits, the base model's unsteered, and the base model's once per
(layer, α) with a hook on ``blocks.{l}.hook_resid_post`` adding α·δ_l at every position
(``unit_sums``).

The engine call that completes δ runs the check with the models it has (``steer_resident`` while a
resident run still holds both, ``steer_sequential`` after a sequential run's SFT pass), so a run in
one call loads no model again for it but a sequential run's base model, once, and a sequential run
never holds both models: its SFT pass leaves each unit's last SFT state in the store
(``put_targets``) and the SFT head in memory, then the base model loads alone and the SFT logits
are read off those states through that head. A call with nothing left to run but the check (a
resumed run, or shards run by other processes) loads what its schedule loads (``run_steering``);
it computes only the units the store lacks.

This module runs the check through TransformerBridge hooks (``resident`` and ``sequential``). The
``stream`` engine runs it with no bridge, from the states its shards keep and the base checkpoint's
blocks after the first steered layer (``lens_compare.engines.stream_steering``); both store the
same sums per unit, and share ``deltas``, ``missing`` and ``steering_due``.
"""

import logging
from collections.abc import Callable

import torch
from einops import rearrange
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.analyses.difference_lens import add_sums
from lens_compare.analyses.steering import Target, divergence_from
from lens_compare.capture.head import Head
from lens_compare.capture.states import capture_states
from lens_compare.engines.job import Job
from lens_compare.engines.loaded import LoadedModel, loaded
from lens_compare.engines.store import Kind, Store
from lens_compare.metrics.aggregate import token_mask
from lens_compare.util.hooks import resid_post

logger = logging.getLogger("lens_compare")

# A batch's SFT next-token logits: given the unit, its first prompt and the batch's ids and mask.
SftLogits = Callable[[int, int, Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]], Float[Tensor, "batch pos vocab"]]


def deltas(job: Job, store: Store) -> Float[Tensor, "layer d_model"]:
    """δ of each steered layer over the ``rest`` tokens, float32, from every shard's sums."""
    lens = job.difference
    sums = add_sums({key: value for key, value in store.get(Kind.DIFFERENCE, shard=shard).items()
                     if key in ("difference", "count")} for shard in range(job.layout.count))
    rest = lens.positions.index("rest")
    rows = [lens.layers.index(layer) for layer in job.steering.layers]
    return (sums["difference"][rows, rest] / sums["count"][rest].double()).float()


def missing(job: Job, store: Store) -> list[int]:
    """The steering units whose sums ``store`` lacks (none without the check)."""
    return [unit for unit in job.steering_units() if not store.has(Kind.STEERING, shard=unit)]


def steering_due(job: Job, store: Store) -> bool:
    """Whether δ is known (every shard's difference-lens sums are in) and some unit lacks its steering sums."""
    return bool(missing(job, store)) and all(store.has(Kind.DIFFERENCE, shard=shard)
                                             for shard in range(job.layout.count))


def _logits(bridge, token_ids: Int[Tensor, "batch pos"], real: Bool[Tensor, "batch pos"], vocab: int,
            hooks: list) -> Float[Tensor, "batch pos vocab"]:
    device = torch.device(bridge.cfg.device)
    logits = bridge.run_with_hooks(token_ids.to(device), fwd_hooks=hooks, return_type="logits",
                                   attention_mask=real.long().to(device))
    return logits[..., :vocab]


def _vocab(job: Job, base: LoadedModel, sft_vocab: int) -> int:
    """The ids the check compares: the logit lens's shared ids when the vocabularies differ."""
    return job.lens_vocab or min(base.bridge.cfg.d_vocab, sft_vocab)


def unit_sums(job: Job, unit: int, base_bridge, sft_logits: SftLogits, delta: Float[Tensor, "layer d_model"],
              vocab: int) -> dict[str, Tensor]:
    """A steering unit's sums (``lens_compare.analyses.steering``) over its ``rest`` tokens."""
    steering = job.steering
    token_ids, real = job.steering_inputs(unit)
    kl = torch.zeros((len(steering.layers), len(steering.alphas)), dtype=torch.float64)
    top1 = torch.zeros_like(kl)
    kl_base = torch.zeros((), dtype=torch.float64)
    top1_base = torch.zeros_like(kl_base)
    with torch.inference_mode():
        for start in range(0, token_ids.shape[0], job.batch_size):
            batch_real = real[start:start + job.batch_size]
            width = int(batch_real.sum(dim=1).max())
            ids, batch_real = token_ids[start:start + job.batch_size, :width], batch_real[:, :width]
            sft = Target.of(sft_logits(unit, start, ids, batch_real)[..., :vocab])
            mask = token_mask(batch_real, "rest")
            device = sft.probs.device
            found = divergence_from(sft, _logits(base_bridge, ids, batch_real, vocab, []).to(device), mask)
            kl_base += found[0]
            top1_base += found[1]
            for row, layer in enumerate(steering.layers):
                for column, alpha in enumerate(steering.alphas):
                    def add(resid, hook, shift=alpha * delta[row]):
                        # The stream's own dtype, not a parameter's (an NF4 model's weights are uint8).
                        return resid + shift.to(device=resid.device, dtype=resid.dtype)

                    steered = _logits(base_bridge, ids, batch_real, vocab, [(resid_post(layer), add)])
                    found = divergence_from(sft, steered.to(device), mask)
                    kl[row, column] += found[0]
                    top1[row, column] += found[1]
    count = token_mask(real, "rest").sum().double()
    return {"kl_base": kl_base, "top1_base": top1_base, "kl": kl, "top1": top1, "count": count}


def _steer(job: Job, store: Store, base: LoadedModel, sft_logits: SftLogits, sft_vocab: int) -> None:
    """Every unit's missing sums with ``base`` loaded and the SFT logits from ``sft_logits``."""
    units = missing(job, store)
    logger.info("steering check: %d unit(s), %d layer(s) x %d alpha(s), one base forward each", len(units),
                len(job.steering.layers), len(job.steering.alphas))
    delta = deltas(job, store)
    vocab = _vocab(job, base, sft_vocab)
    for unit in units:
        store.put(Kind.STEERING, unit_sums(job, unit, base.bridge, sft_logits, delta, vocab), shard=unit)


def steer_resident(job: Job, store: Store, base: LoadedModel, sft: LoadedModel) -> None:
    """The check with both models loaded: the SFT logits from its own forward."""
    def sft_logits(unit, start, ids, real):
        return _logits(sft.bridge, ids, real, sft.bridge.cfg.d_vocab, [])

    _steer(job, store, base, sft_logits, sft.bridge.cfg.d_vocab)


def put_targets(job: Job, store: Store, sft: LoadedModel) -> Head:
    """Each unit's last SFT state that neither the store's sums nor its targets hold, stored
    (``Kind.STEERING_TARGET``), and a copy of the SFT head to read them with once ``sft`` is closed."""
    last = sft.bridge.cfg.n_layers
    for unit in missing(job, store):
        if not store.has(Kind.STEERING_TARGET, shard=unit):
            token_ids, real = job.steering_inputs(unit)
            states = capture_states(sft.bridge, token_ids, real, (last,), batch_size=job.batch_size,
                                    label="sft (steering)")
            store.put(Kind.STEERING_TARGET, {"sft": states.values[0]}, shard=unit)
    return sft.head.detached()


def steer_sequential(job: Job, store: Store, sft_head: Head) -> None:
    """The check after a sequential run's SFT pass (``put_targets``): the base model loaded alone,
    the SFT logits read off the stored last states through ``sft_head``."""
    targets: dict[int, Tensor] = {}

    def sft_logits(unit, start, ids, real):
        if unit not in targets:
            targets.clear()
            targets[unit] = store.get(Kind.STEERING_TARGET, shard=unit)["sft"]
        state = targets[unit][start:start + ids.shape[0], :ids.shape[1]]
        flat = sft_head.logits(rearrange(state, "batch pos d_model -> (batch pos) d_model"))
        return rearrange(flat, "(batch pos) vocab -> batch pos vocab", batch=state.shape[0]).float()

    with loaded(job, job.sides[0], store) as base:
        _steer(job, store, base, sft_logits, sft_head.vocab)
    for unit in job.steering_units():
        store.drop(Kind.STEERING_TARGET, shard=unit)


def run_steering(job: Job, store: Store, schedule: str) -> None:
    """The check when no model is loaded: ``resident`` loads both at once, ``sequential`` one at a time."""
    base_side, sft_side = job.sides
    if schedule == "resident":
        with loaded(job, base_side, store) as base, loaded(job, sft_side, store) as sft:
            steer_resident(job, store, base, sft)
        return
    with loaded(job, sft_side, store) as sft:
        head = put_targets(job, store, sft)
    steer_sequential(job, store, head)
