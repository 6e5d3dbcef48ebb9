"""The TransformerBridge engines: ``resident`` and ``sequential``, on one device, split or NF4.

``resident`` loads both models and runs every pending shard through each. ``sequential``
loads the base model once, runs every pending shard and spills its residual states to
the store (a run folder on disk for the CLI), frees it completely, then loads the SFT
model once and compares shard by shard against the spilled states. So each model is
loaded once per run however many shards there are, and only one model's weights are
ever in memory.

The steering check (``lens_compare.engines.steering``) runs at the end of the call that completes
the difference lens's δ: ``resident`` with the two models it holds, ``sequential`` with its SFT
model (each unit's last state kept) and then the base model loaded once more, alone.
"""

from tqdm import tqdm

from lens_compare.analyses.components import component_metrics
from lens_compare.analyses.logit_lens import logit_lens_metrics
from lens_compare.capture.head import Head
from lens_compare.engines.difference import put_readings, put_sums, readings_due
from lens_compare.engines.job import Job, lens_progress
from lens_compare.engines.loaded import loaded
from lens_compare.engines.steering import put_targets, run_steering, steer_resident, steer_sequential, steering_due
from lens_compare.engines.store import Kind, Store
from lens_compare.metrics.per_token import state_metrics
from lens_compare.metrics.states import ResidualStates
from lens_compare.util.progress import progress_bar


def shard_metrics(job: Job, shard: int, base: ResidualStates, sft: ResidualStates,
                  heads: dict[str, Head] | None) -> dict:
    """A shard's per-token metrics: every residual state's, the sublayer comparisons and, with
    ``heads``, the logit lens."""
    metrics = {**state_metrics(base, sft), **component_metrics(base, sft)}
    if heads is not None:
        captured = {"base": base, "sft": sft}
        _, real = job.shard_inputs(shard)
        with lens_progress(job, shard) as on_layer:
            metrics.update(logit_lens_metrics(
                heads, lambda role, state: captured[role].values[captured[role].states.index(state)],
                job.lens_layers, base.n_layers, real, budget=job.lens_chunk_bytes, on_layer=on_layer))
    return metrics


def _pending(job: Job, store: Store) -> list[int]:
    return [shard for shard in job.selected_shards() if not store.has(Kind.METRICS, shard=shard)]


def _put_shard(job: Job, store: Store, shard: int, base: ResidualStates, sft: ResidualStates,
               heads: dict[str, Head] | None) -> None:
    """A shard's difference-lens sums, then its metrics: a shard whose metrics are stored is done."""
    put_sums(job, store, shard, base, sft)
    store.put(Kind.METRICS, shard_metrics(job, shard, base, sft, heads), shard=shard)


def _difference_readings(job: Job, store: Store, heads: dict[str, Head] | None) -> None:
    """The difference lens's readings, once the store holds every shard's sums; without ``heads``
    (a call with no shard to run) each model is loaded alone for its head."""
    if not readings_due(job, store):
        return
    if heads is None:
        heads = {}
        for side in job.sides:
            with loaded(job, side, store) as model:
                heads[side.role] = model.head.detached()
    put_readings(job, store, heads)


def _bar(job: Job, shards: list[int], desc: str) -> tqdm:
    total = sum(job.shard_prompts(shard) for shard in job.selected_shards())
    done = total - sum(job.shard_prompts(shard) for shard in shards)
    return progress_bar(total=total, initial=done, desc=desc, unit="prompt", dynamic_ncols=True)


def run_resident(job: Job, store: Store) -> None:
    """Both models loaded at once; each pending shard through both, then its metrics stored."""
    pending = _pending(job, store)
    if not pending:
        _difference_readings(job, store, None)
        if steering_due(job, store):
            run_steering(job, store, "resident")
        return
    base_side, sft_side = job.sides
    with loaded(job, base_side, store) as base, loaded(job, sft_side, store) as sft:
        heads = {"base": base.head, "sft": sft.head} if job.logit_lens else None
        with _bar(job, pending, "base+sft") as bar:
            for shard in pending:
                base_states = base.capture(job, shard, None)
                sft_states = sft.capture(job, shard, bar.update)
                if job.keep_states:
                    store.put(Kind.STATES, base_states, role="base", shard=shard)
                    store.put(Kind.STATES, sft_states, role="sft", shard=shard)
                _put_shard(job, store, shard, base_states, sft_states, heads)
        _difference_readings(job, store, heads)
        if steering_due(job, store):
            steer_resident(job, store, base, sft)


def run_sequential(job: Job, store: Store) -> None:
    """Base once for every pending shard (states spilled to the store), then SFT once."""
    pending = _pending(job, store)
    base_side, sft_side = job.sides
    need_base = [shard for shard in pending if not store.has(Kind.STATES, role="base", shard=shard)]
    base_head = None
    if need_base:
        with loaded(job, base_side, store) as base, _bar(job, need_base, "base") as bar:
            for shard in need_base:
                store.put(Kind.STATES, base.capture(job, shard, bar.update), role="base", shard=shard)
            # Kept for the logit lens: the final norm and unembedding only, copied out of the model.
            base_head = base.head.detached() if base.head is not None else None
    if not pending:
        _difference_readings(job, store, None)
        if steering_due(job, store):
            run_steering(job, store, "sequential")
        return
    if job.logit_lens and base_head is None:
        # Resumed after every base shard was spilled: the lens still needs the base model's head.
        with loaded(job, base_side, store) as base:
            base_head = base.head.detached()
    with loaded(job, sft_side, store) as sft, _bar(job, pending, "sft") as bar:
        heads = {"base": base_head, "sft": sft.head} if job.logit_lens else None
        for shard in pending:
            sft_states = sft.capture(job, shard, bar.update)
            base_states = store.get(Kind.STATES, role="base", shard=shard)
            if job.keep_states:
                store.put(Kind.STATES, sft_states, role="sft", shard=shard)
            _put_shard(job, store, shard, base_states, sft_states, heads)
            if not job.keep_states:
                store.drop(Kind.STATES, role="base", shard=shard)
        _difference_readings(job, store, heads)
        sft_head = put_targets(job, store, sft) if steering_due(job, store) else None
    if sft_head is not None:
        steer_sequential(job, store, sft_head)
