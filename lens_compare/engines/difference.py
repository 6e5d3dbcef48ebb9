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
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_compare.analyses.difference_lens import add_sums, read_difference, shard_sums, stack_sums, sums_at
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


def put_sums(job: Job, store: Store, shard: int, base: ResidualStates, sft: ResidualStates) -> None:
    """Store a shard's sums from both models' captured states; nothing without the lens."""
    if job.difference is not None:
        rows = tuple(base.states.index(state) for state in job.difference.states)
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


def put_readings(job: Job, store: Store, heads: dict[str, Head]) -> None:
    """The run's readings from every shard's sums, through ``heads`` (over the shared ids): over
    whole prompts (``records``), and over the first N positions of each shorter length a sweep reads
    off this capture (``prefixes``, by N)."""
    sums = add_sums(store.get(Kind.DIFFERENCE, shard=shard) for shard in range(job.layout.count))
    lens = job.difference

    def read(cut: int | None) -> list[dict]:
        return read_difference(heads, sums_at(sums, cut), lens.layers, lens.positions, lens.top)

    with torch.inference_mode():
        store.put(Kind.DIFFERENCE_LENS, {"records": read(None), "prefixes": {str(cut): read(cut) for cut in lens.cuts}})
