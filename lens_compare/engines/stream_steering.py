"""The steering check in the ``stream`` engine: the base checkpoint's blocks after the first steered
layer read once more, each run over every steered branch.

With the check on, a streamed shard keeps in the store what the check starts from
(``steering_states``): the base model's ``resid_post`` of each steered layer l (state l + 1) and both
models' last state; the stream drops its other states as usual. Once the difference lens's δ is
known (``steering_due``: at the end of the call that stores the last shard's sums, or of a later
call), each missing unit is a set of branches, one per (l, α), each starting as the base model's
state l + 1 plus α·δ_l (cast to the stream's dtype, padding zeroed): what the bridge engines' hook
on ``blocks.{l}.hook_resid_post`` gives. A pass (``Pass``) reads the base blocks from its first
branch's layer + 1 to the last once, on the prefetching thread, and runs each block over every
branch started by then. At its end the branches' last states and both models' unsteered ones go
through the heads read for the logit lens, and a unit whose branches are all done has its sums
stored (``Kind.STEERING``, the bridge engines' format) and its kept states dropped: an interrupted
check recomputes only the units whose sums are missing.

Units with no kept states, the held-out prompts (``--steer-prompts``) and a shard whose states are
gone, are embedded and streamed whole through both checkpoints in the first pass (SFT unsteered,
base unsteered and the branches off it), beside the other units' branches.

Memory: a pass holds one host state per branch (and two per unit streamed whole), plus one block's
output and the two last states read back at its end, within ``pass_budget``: what the core stream
held for its largest shard (two states of each model), or ``SHARD_BUDGET_BYTES`` where that is
more. Branches that do not fit go to further passes (``plan_passes``, in unit order), each reading
the base blocks after its own first layer again; a unit streamed whole whose branches spill over
stores its kept states for them. Reads: one pass over the base blocks after the first steered
layer when everything fits (the tiny test models), plus both checkpoints' embeddings and blocks
with held-out prompts; the heads are the logit lens's.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_compare.analyses.logit_lens import chunk_tokens
from lens_compare.analyses.steering import Target, divergence_from
from lens_compare.capture.head import Head
from lens_compare.capture.streamed import StreamedModel, forward_batches, prefetched
from lens_compare.engines.job import Job
from lens_compare.engines.shards import SHARD_BUDGET_BYTES
from lens_compare.engines.steering import deltas, missing
from lens_compare.engines.store import ROLES, Kind, Store
from lens_compare.metrics.aggregate import token_mask
from lens_compare.util.host_memory import trim_heap
from lens_compare.util.progress import progress_bar

logger = logging.getLogger("lens_compare")


@dataclass(frozen=True)
class Branch:
    """A unit's base model steered by α·δ_l: ``row`` is l's index in ``Steering.layers``, ``column`` α's."""

    unit: int
    row: int
    column: int


@dataclass(frozen=True)
class Pass:
    """One read of the blocks: the units streamed whole from their embeddings, and the branches."""

    whole: tuple[int, ...]
    branches: tuple[Branch, ...]


def steering_states(job: Job) -> dict[str, frozenset[int]]:
    """The states a streamed unit keeps for the steering check, by role (none without it): the
    base model's state l + 1 of each steered layer l, and both models' last state. The check needs
    the logit lens, so the last state is the run's last (``max(job.states)``)."""
    if job.steering is None:
        return {role: frozenset() for role in ROLES}
    last = max(job.states)
    return {"base": frozenset({layer + 1 for layer in job.steering.layers} | {last}), "sft": frozenset({last})}


def drop_kept(job: Job, store: Store, unit: int) -> None:
    """A unit's states kept for the check, once its sums are stored (a shard's saved residuals stay)."""
    for role, states in steering_states(job).items():
        for state in states:
            if not (job.keep_states and not job.held_out(unit) and state in job.states):
                store.drop(Kind.STATE, role=role, shard=unit, state=state)


def _has_kept(job: Job, store: Store, unit: int) -> bool:
    return all(store.has(Kind.STATE, role=role, shard=unit, state=state)
               for role, states in steering_states(job).items() for state in states)


def pass_budget(job: Job, models: dict[str, StreamedModel]) -> int:
    """Host bytes a pass's states may take: what the core stream held for its largest shard (two
    states of each model), or ``SHARD_BUDGET_BYTES`` where that is more."""
    prompts, width = max((job.shard_inputs(shard)[1].shape for shard in range(job.layout.count)),
                         key=lambda shape: shape[0] * shape[1])
    return max(SHARD_BUDGET_BYTES, sum(2 * prompts * width * _vector_bytes(model) for model in models.values()))


def _vector_bytes(model: StreamedModel) -> int:
    return model.d_model * model.dtype.itemsize


def plan_passes(job: Job, units: list[int], stored: set[int], size: Callable[[int, str], int],
                budget: int) -> list[Pass]:
    """``units``' work in passes: the units not ``stored`` (streamed whole) first, then each unit's
    branches in layer, then α, order; a pass takes items while its states (``size(unit, role)``
    bytes each: one a branch, two a unit streamed whole), one block's output and two last states
    stay within ``budget``, and at least one item."""
    steering = job.steering
    items: list[int | Branch] = []
    for unit in sorted(units, key=lambda unit: unit in stored):
        if unit not in stored:
            items.append(unit)
        items.extend(Branch(unit, row, column) for row in range(len(steering.layers))
                     for column in range(len(steering.alphas)))

    def held(found: list[int | Branch]) -> int:
        units = {item.unit if isinstance(item, Branch) else item for item in found}
        states = sum(size(item.unit, "base") if isinstance(item, Branch) else size(item, "base") + size(item, "sft")
                     for item in found)
        return states + 2 * max(size(unit, role) for unit in units for role in ROLES)

    passes: list[list[int | Branch]] = [[]]
    for item in items:
        if passes[-1] and held([*passes[-1], item]) > budget:
            passes.append([])
        passes[-1].append(item)
    return [Pass(tuple(item for item in found if not isinstance(item, Branch)),
                 tuple(item for item in found if isinstance(item, Branch))) for found in passes if found]


def steer_streamed(job: Job, store: Store, models: dict[str, StreamedModel], heads: dict[str, Head]) -> None:
    """Every missing unit's sums, in passes over the base blocks (see the module docstring)."""
    units = missing(job, store)
    delta = deltas(job, store)
    # A held-out unit has kept states only where an earlier call stored them for a later pass.
    stored = {unit for unit in units if _has_kept(job, store, unit)}

    def size(unit: int, role: str) -> int:
        prompts, width = job.steering_inputs(unit)[1].shape
        return prompts * width * _vector_bytes(models[role])

    passes = plan_passes(job, units, stored, size, pass_budget(job, models))
    before = {role: model.checkpoint.bytes_read for role, model in models.items()}
    logger.info("steering check: %d unit(s) (%d streamed whole), %d layer(s) x %d alpha(s), in %d pass(es) over the "
                "base blocks", len(units), len(units) - len(stored), len(job.steering.layers),
                len(job.steering.alphas), len(passes))
    totals: dict[int, dict[str, Tensor]] = {}
    left = dict.fromkeys(units, len(job.steering.layers) * len(job.steering.alphas))
    seen: set[int] = set()
    for index, step in enumerate(passes):
        def finished(unit: int, sums: dict[str, Tensor], step: Pass = step) -> None:
            """A unit's sums of this pass; stored, and its kept states dropped, once all its branches ran."""
            totals[unit] = _add(totals[unit], sums) if unit in totals else sums
            left[unit] -= sum(branch.unit == unit for branch in step.branches)
            if left[unit] == 0:
                store.put(Kind.STEERING, totals.pop(unit), shard=unit)
                drop_kept(job, store, unit)

        later = {branch.unit for following in passes[index + 1:] for branch in following.branches}
        _run_pass(job, store, models, heads, delta, step, keep=set(step.whole) & later, unsteered=set(units) - seen,
                  finished=finished, desc="steering" + (f" {index + 1}/{len(passes)}" if len(passes) > 1 else ""))
        seen.update(branch.unit for branch in step.branches)
        seen.update(step.whole)
    logger.info("steering check: read %s from the checkpoints", ", ".join(
        f"{role} {(model.checkpoint.bytes_read - before[role]) / 2**30:.3f} GiB" for role, model in models.items()))


def _add(a: dict[str, Tensor], b: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: a[key] + b[key] for key in a}


def _stand_in(model: StreamedModel, real: Bool[Tensor, "prompt pos"]) -> Float[Tensor, "prompt pos d_model"]:
    """States of a unit's shape and dtype, for its masks and rotary embeddings (which read nothing
    else of them): one zero, expanded."""
    return torch.zeros((), dtype=model.dtype).expand(*real.shape, model.d_model)


def _steered(state: Float[Tensor, "prompt pos d_model"], shift: Float[Tensor, " d_model"],
             real: Bool[Tensor, "prompt pos"]) -> Float[Tensor, "prompt pos d_model"]:
    # The stream's own dtype, as the bridge engines' hook adds it; padding stays zero as in every state.
    return (state + shift.to(state.dtype)).masked_fill_(~real[..., None], 0)


def _run_pass(job: Job, store: Store, models: dict[str, StreamedModel], heads: dict[str, Head],
              delta: Float[Tensor, "layer d_model"], step: Pass, keep: set[int], unsteered: set[int],
              finished: Callable[[int, dict[str, Tensor]], None], desc: str) -> None:
    """One pass: each of its units' sums over its branches (and the ``unsteered`` ones' base model's)
    to ``finished`` as soon as they are known. ``keep``: units streamed whole whose kept states go
    to the store for a later pass."""
    steering = job.steering
    n_layers = models["base"].n_layers
    units = sorted({branch.unit for branch in step.branches} | set(step.whole))
    inputs = {unit: job.steering_inputs(unit) for unit in units}
    batches = {unit: forward_batches(inputs[unit][1], job.batch_size) for unit in units}
    plain: dict[int, dict[str, Tensor]] = {}
    for unit in step.whole:
        token_ids, real = inputs[unit]
        plain[unit] = {role: model.embed(token_ids, batches[unit]).masked_fill_(~real[..., None], 0)
                       for role, model in models.items()}
    # Each model's first block: 0 for a unit streamed whole, else the first branch's layer + 1.
    first = {"base": 0 if step.whole else min(steering.layers[branch.row] + 1 for branch in step.branches),
             "sft": 0 if step.whole else n_layers}
    contexts = {(unit, role): models[role].contexts(_stand_in(models[role], inputs[unit][1]), inputs[unit][1],
                                                    batches[unit])
                for unit in units for role in ROLES if role == "base" or unit in plain}
    kept = steering_states(job)
    branches: dict[Branch, Tensor] = {}

    def start(block: int) -> None:
        """The branches whose layer's output is state ``block``, off the unsteered base state."""
        sources: dict[int, Tensor] = {}
        for branch in step.branches:
            layer = steering.layers[branch.row]
            if layer + 1 != block:
                continue
            if branch.unit not in sources:
                sources[branch.unit] = plain[branch.unit]["base"] if branch.unit in plain else \
                    store.get(Kind.STATE, role="base", shard=branch.unit, state=block)
            branches[branch] = _steered(sources[branch.unit], steering.alphas[branch.column] * delta[branch.row],
                                        inputs[branch.unit][1])

    order = [(role, block) for block in range(min(first.values()), n_layers) for role in ROLES if block >= first[role]]
    loads = [lambda role=role, block=block: models[role].load(models[role].block_path(block)) for role, block in order]
    with prefetched(loads) as modules, progress_bar(total=len(order), desc=desc, unit="block",
                                                    dynamic_ncols=True, leave=False) as bar:
        for block in range(min(first.values()), n_layers):
            start(block)
            for role in ROLES:
                if block < first[role]:
                    continue
                model, module = models[role], next(modules)
                for unit in plain:
                    plain[unit][role] = model.run_block(block, module, plain[unit][role], inputs[unit][1],
                                                        contexts[unit, role])
                    if unit in keep and block + 1 in kept[role]:
                        store.put(Kind.STATE, plain[unit][role], role=role, shard=unit, state=block + 1)
                if role == "base":
                    for branch in branches:
                        branches[branch] = model.run_block(block, module, branches[branch],
                                                           inputs[branch.unit][1], contexts[branch.unit, role])
                model.free(module)
                del module
                bar.update(1)
            trim_heap()
    start(n_layers)
    for unit in units:
        last = plain.pop(unit, None) or {role: store.get(Kind.STATE, role=role, shard=unit, state=n_layers)
                                         for role in ROLES}
        mine = {branch: branches.pop(branch) for branch in step.branches if branch.unit == unit}
        finished(unit, unit_divergences(job, heads, inputs[unit][1], last, mine, unit in unsteered))


def unit_divergences(job: Job, heads: dict[str, Head], real: Bool[Tensor, "prompt pos"],
                     last: dict[str, Float[Tensor, "prompt pos d_model"]],
                     branches: dict[Branch, Float[Tensor, "prompt pos d_model"]], unsteered: bool) -> dict[str, Tensor]:
    """A unit's sums (``lens_compare.engines.steering.unit_sums``'s format) over its ``rest`` tokens
    from last states: ``branches``' (the rest of ``kl`` and ``top1`` zero) and, if ``unsteered``,
    the base model's (``kl_base``, ``top1_base``, ``count``; else zero), each against the SFT
    model's, through the heads, in chunks of tokens sized as the logit lens's."""
    steering = job.steering
    kl = torch.zeros((len(steering.layers), len(steering.alphas)), dtype=torch.float64)
    top1 = torch.zeros_like(kl)
    kl_base = torch.zeros((), dtype=torch.float64)
    top1_base = torch.zeros_like(kl_base)
    mask = token_mask(real, "rest")
    prompts, positions = mask.nonzero(as_tuple=True)
    vocab = min(head.vocab for head in heads.values())
    step = chunk_tokens(vocab, job.lens_chunk_bytes, heads["sft"].weight.element_size())
    with torch.inference_mode():
        for begin in range(0, len(prompts), step):
            at = prompts[begin:begin + step], positions[begin:begin + step]
            # The SFT distribution once per chunk, for the many distributions compared with it.
            sft = Target.of(heads["sft"].logits(last["sft"][at])[None, :, :vocab])
            everywhere = torch.ones(sft.top1.shape, dtype=torch.bool)

            def against(state: Tensor, sft=sft, at=at, everywhere=everywhere) -> tuple[Tensor, Tensor]:
                return divergence_from(sft, heads["base"].logits(state[at])[None, :, :vocab], everywhere)

            if unsteered:
                found = against(last["base"])
                kl_base += found[0]
                top1_base += found[1]
            for branch, state in branches.items():
                found = against(state)
                kl[branch.row, branch.column] += found[0]
                top1[branch.row, branch.column] += found[1]
    count = mask.sum().double() if unsteered else torch.zeros((), dtype=torch.float64)
    return {"kl_base": kl_base, "top1_base": top1_base, "kl": kl, "top1": top1, "count": count}
