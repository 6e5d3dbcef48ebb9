"""The difference lens in the store: each shard's sums, then the run's readings once all are in.

Every engine stores a shard's sums (``Kind.DIFFERENCE``, ``lens_compare.analyses.difference_lens``)
before its metrics, so a shard whose metrics are stored has its sums too. A streamed shard adds
each state's sums to that state's metrics as the state arrives (a shard resumed mid-stream keeps
them) and stacks them when its last block is done.

The readings need both models' heads, which exist only while an engine has the models: at the end
of every engine call, whichever call finds every shard's sums in the store and no readings
computes them (``readings_due``, ``put_readings``). Shards that run in several processes into one
run folder: the last one to store its sums sees them all (each store is written before the check
that follows it); two that both see them write the same file. A call with no shard left to run
whose store lacks the readings (a run interrupted between its last sums and its readings) loads
the heads for them alone.

The top positions (``lens_compare.analyses.difference_positions``) need every token's difference
once δ is known: each engine stores a shard's spill (``Kind.DIFFERENCE_UNITS``, one entry per lens
state) before its sums, so a store with every shard's sums holds every spill too; the readings rank
them, from the store alone, and drop them once the readings are stored. A process that finds the
spill gone while it ranks (another one stored the readings meanwhile) leaves the readings to it.
"""

from collections.abc import Iterator
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_compare.analyses.difference_lens import add_sums, read_difference, shard_sums, stack_sums, sums_at
from lens_compare.analyses.difference_positions import rank_positions, unit_differences
from lens_compare.capture.head import Head
from lens_compare.engines.job import Job
from lens_compare.engines.store import Kind, Store
from lens_compare.metrics.states import ResidualStates

# A streamed state's sums go beside its metrics, under this prefix, until the shard's are stacked.
STATE_PREFIX = "difference_lens."


def shard_masks(job: Job, shard: int) -> Bool[Tensor, "token_class prompt pos"]:
    """The token classes of a shard's prompts, as wide as its inputs (``Job.shard_inputs``)."""
    start, stop = job.layout.bounds[shard]
    _, real = job.shard_inputs(shard)
    return job.difference.masks[:, start:stop, : real.shape[1]]


def _sums(job: Job, shard: int, base: Tensor, sft: Tensor, rows: tuple[int, ...]) -> dict[str, Tensor]:
    _, real = job.shard_inputs(shard)
    return shard_sums(base, sft, rows, shard_masks(job, shard), real, job.difference.cuts)


def put_units(job: Job, store: Store, shard: int, state: int, base: Float[Tensor, "prompt pos d_model"],
              sft: Float[Tensor, "prompt pos d_model"]) -> None:
    """Store a state's spill for the top positions (nothing unless the lens ranks them at that state)."""
    lens = job.difference
    if lens is not None and lens.ranks_positions and state in lens.states:
        tokens = einops.reduce(shard_masks(job, shard), "token_class prompt pos -> prompt pos", "max")
        store.put(Kind.DIFFERENCE_UNITS, unit_differences(base, sft, tokens, job.layout.bounds[shard][0]),
                  shard=shard, state=state)


def put_sums(job: Job, store: Store, shard: int, base: ResidualStates, sft: ResidualStates) -> None:
    """Store a shard's spill and sums from both models' captured states; nothing without the lens."""
    if job.difference is not None:
        rows = tuple(base.states.index(state) for state in job.difference.states)
        for row, state in zip(rows, job.difference.states, strict=True):
            put_units(job, store, shard, state, base.values[row], sft.values[row])
        store.put(Kind.DIFFERENCE, _sums(job, shard, base.values, sft.values, rows), shard=shard)


def state_sums(job: Job, shard: int, state: int, base: Float[Tensor, "prompt pos d_model"],
               sft: Float[Tensor, "prompt pos d_model"]) -> dict[str, Tensor]:
    """A streamed state's sums, to store with its metrics (empty unless the lens reads that state)."""
    if job.difference is None or state not in job.difference.states:
        return {}
    return {STATE_PREFIX + key: value for key, value in _sums(job, shard, base[None], sft[None], (0,)).items()}


def put_streamed_sums(job: Job, store: Store, shard: int) -> None:
    """Stack a finished streamed shard's state sums into its ``Kind.DIFFERENCE`` entry."""
    if job.difference is None:
        return
    rows = []
    for state in job.difference.states:
        metrics = store.get(Kind.STATE_METRICS, shard=shard, state=state)
        rows.append({key.removeprefix(STATE_PREFIX): value for key, value in metrics.items()
                     if key.startswith(STATE_PREFIX)})
    store.put(Kind.DIFFERENCE, stack_sums(rows), shard=shard)


def readings_due(job: Job, store: Store) -> bool:
    """Whether the store holds every shard's sums and not yet the readings."""
    return (job.difference is not None and not store.has(Kind.DIFFERENCE_LENS)
            and all(store.has(Kind.DIFFERENCE, shard=shard) for shard in range(job.layout.count)))


def top_positions(job: Job, store: Store, sums: dict[str, Tensor]) -> dict[int | None, list[dict[str, Any]] | None]:
    """The top positions (``rank_positions``) from every shard's spill in the store."""
    def spills(layer: int) -> Iterator[dict[str, Tensor]]:
        return (store.get(Kind.DIFFERENCE_UNITS, shard=shard, state=layer + 1) for shard in range(job.layout.count))

    return rank_positions(spills, sums, job.difference, job.token_ids)


def put_readings(job: Job, store: Store, heads: dict[str, Head]) -> None:
    """The run's readings from every shard's sums, through ``heads`` (over the shared ids), and its
    top positions from every shard's spill: over whole prompts (``records``, ``positions``), and over
    the first N positions of each shorter length a sweep reads off this capture (``prefixes``,
    ``prefix_positions``, by N). Then the spill is dropped."""
    sums = add_sums(store.get(Kind.DIFFERENCE, shard=shard) for shard in range(job.layout.count))
    lens = job.difference

    def read(cut: int | None) -> list[dict]:
        return read_difference(heads, sums_at(sums, cut), lens.layers, lens.positions, lens.top)

    try:
        positions = top_positions(job, store, sums)
    except (KeyError, FileNotFoundError):
        if store.has(Kind.DIFFERENCE_LENS):
            return  # another process stored the readings, and dropped the spill, while this one ranked
        raise
    with torch.inference_mode():
        store.put(Kind.DIFFERENCE_LENS, {
            "records": read(None), "prefixes": {str(cut): read(cut) for cut in lens.cuts},
            "positions": positions[None], "prefix_positions": {str(cut): positions[cut] for cut in lens.cuts}})
    store.drop(Kind.DIFFERENCE_UNITS)
