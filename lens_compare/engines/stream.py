"""The ``stream`` engine: both models layer-major, in lockstep, each checkpoint read once.

For each pending shard: embed every prompt in both models, then for each block l run
block l of the base model over every prompt, then block l of the SFT model, compute
the metrics of the new state and drop the state before it. Host memory holds two
states of each model, the device one block (two while the next one is read on a
background thread). After every block pair the newest state of both models and its
metrics go to the store: a killed run resumes from the last finished block, losing at
most the block in progress. With ``keep_states`` (``--save-residuals``) the captured
states stay in the store, one per file.

The logit lens: both models' final norm and unembedding are read before the first block and
stay on the device for the whole run. At the output only (``final``, the default) the lens runs
on the last state as it arrives, and a shard still holds two states per model. At other layers
it needs each of those states until the last one arrives (every layer's distribution is compared
with the final one): those states stay in the store (the run folder on disk for the CLI, memory
for ``compare()``; the planner counts them) and the lens reads each back once at the shard's end.

The steering check (``--steer``, ``lens_compare.engines.stream_steering``): a shard also keeps the
base model's state after each steered layer and both models' last state, until the check has run.
The call that completes the difference lens's δ then reads the base checkpoint's blocks after the
first steered layer once more and runs each over every steered branch (α·δ_l added to the stored
state), comparing the branches' last states with the SFT model's through the heads above; held-out
prompts (``--steer-prompts``) are streamed through both checkpoints whole in that same pass. Each
unit's sums go to the store as they are known, so an interrupted check resumes with the missing
units only.

A shard is still a group of prompts (the CLI makes one shard of every prompt unless
``--shard-size`` says otherwise, since a streamed shard's memory is two states, not all
of them); each shard reads both checkpoints once.
"""

import logging

from jaxtyping import Float
from torch import Tensor

from lens_compare.analyses.components import COMPONENT_KEYS, block_component_metrics, stack_rows
from lens_compare.analyses.logit_lens import logit_lens_metrics
from lens_compare.capture.head import Head
from lens_compare.capture.streamed import StreamedModel, forward_batches, prefetched
from lens_compare.engines.difference import put_readings, put_streamed_sums, put_units, readings_due, state_sums
from lens_compare.engines.job import Job, lens_progress
from lens_compare.engines.steering import steering_due
from lens_compare.engines.store import ROLES, Kind, Store
from lens_compare.engines.stream_steering import steer_streamed, steering_states
from lens_compare.metrics.per_token import one_state_metrics, stack_state_rows
from lens_compare.models.facts import ModelFacts, model_facts
from lens_compare.models.loading import fingerprint_tensors
from lens_compare.util.hooks import COMPONENTS
from lens_compare.util.host_memory import trim_heap
from lens_compare.util.progress import progress_bar

logger = logging.getLogger("lens_compare")


def _open_models(job: Job) -> dict[str, StreamedModel]:
    """Both models' skeletons and checkpoints, every tensor the run reads checked (headers only)."""
    models = {}
    for side in job.sides:
        models[side.role] = StreamedModel.open(side.role, side.ref, job.model_configs[side.role],
                                               job.loads[side.role])
    n_blocks = max(job.states)
    for model in models.values():
        model.validate(n_blocks)
    return models


def _facts(job: Job, model: StreamedModel, embedding: Tensor) -> ModelFacts:
    norm = model.read_final_norm_weight()
    return model_facts(
        model.role, embedding, job.prompt_ids, base_lacks=job.base_lacks,
        fingerprint=fingerprint_tensors([embedding] + ([norm] if norm is not None else [])),
        load=f"{job.loads[model.role].describe()}, streamed block by block",
        # Every block passes through the run device, one (two while prefetching) at a time.
        placement={str(model.device): {"blocks": list(range(model.n_layers)), "gib": None, "streamed": True}},
    )


def _resume_point(store: Store, shard: int) -> int | None:
    """The newest state both models have stored for ``shard`` (None: start from the embeddings)."""
    held = [{key.state for key in store.keys(Kind.STATE, role=role, shard=shard)} for role in ROLES]
    common = held[0] & held[1]
    return max(common) if common else None


def run_stream(job: Job, store: Store) -> None:
    """Every pending shard through both models, layer-major (see the module docstring)."""
    pending = [shard for shard in job.selected_shards() if not store.has(Kind.METRICS, shard=shard)]
    if not pending and not readings_due(job, store) and not steering_due(job, store):
        return
    models = _open_models(job)
    heads, head_bytes = _read_heads(job, models)
    try:
        for shard in pending:
            _stream_shard(job, store, models, shard, heads)
        # The difference lens's readings, once every shard's sums are in (the heads alone were read
        # for them when no shard was left to run).
        if readings_due(job, store):
            put_readings(job, store, heads)
        if steering_due(job, store):
            steer_streamed(job, store, models, heads)
    finally:
        for role, head in (heads or {}).items():
            models[role].free(head.norm)
    for role, model in models.items():
        logger.info("%s model: read %.3f GiB from its checkpoint of %.3f GiB (%d shard(s))%s", role,
                    model.checkpoint.bytes_read / 2**30, model.checkpoint.total_bytes / 2**30, len(pending),
                    f"; of it, {head_bytes[role] / 2**30:.3f} GiB were its final norm and unembedding, read for "
                    "the logit lens (with tied embeddings, the token embedding's matrix a second time)"
                    if heads else "")


def _read_heads(job: Job, models: dict[str, StreamedModel]) -> tuple[dict[str, Head] | None, dict[str, int]]:
    """Both models' final norm and unembedding, on the run device before the first block (the logit
    lens), over the ids both vocabularies share; and the bytes each read from its checkpoint."""
    if not job.logit_lens:
        return None, {}
    heads, read = {}, {}
    for role, model in models.items():
        before = model.checkpoint.bytes_read
        head = model.read_head()
        read[role] = model.checkpoint.bytes_read - before
        heads[role] = head.shared(job.lens_vocab) if job.lens_vocab else head
    return heads, read


def lens_states(job: Job) -> set[int]:
    """The states the logit lens reads: each lensed layer's resid_post."""
    return {layer + 1 for layer in job.lens_layers}


def _stream_shard(job: Job, store: Store, models: dict[str, StreamedModel], shard: int,
                  heads: dict[str, Head] | None) -> None:
    token_ids, real = job.shard_inputs(shard)
    batches = forward_batches(real, job.batch_size)
    n_blocks = max(job.states)
    start = _resume_point(store, shard)
    if start is None:
        hidden = {}
        for role, model in models.items():
            def keep_facts(weight, role=role, model=model):
                if not store.has(Kind.FACTS, role=role):
                    store.put(Kind.FACTS, _facts(job, model, weight).to_dict(), role=role)

            hidden[role] = model.embed(token_ids, batches, on_embedding=keep_facts)
            hidden[role].masked_fill_(~real[..., None], 0)
        _finish_state(job, store, shard, 0, hidden, None)
        start = 0
    else:
        hidden = {role: store.get(Kind.STATE, role=role, shard=shard, state=start) for role in ROLES}
        logger.info("shard %d: resuming the stream after block %d of %d", shard, start - 1, n_blocks)
    contexts = {role: model.contexts(hidden[role], real, batches) for role, model in models.items()}
    order = [(role, block) for block in range(start, n_blocks) for role in ROLES]
    loads = [lambda role=role, block=block: models[role].load(models[role].block_path(block))
             for role, block in order]
    desc = f"stream shard {shard + 1}/{job.layout.count}" if job.layout.count > 1 else "stream"
    with prefetched(loads) as modules, progress_bar(total=n_blocks, initial=start, desc=desc, unit="block",
                                            dynamic_ncols=True) as bar:
        for block in range(start, n_blocks):
            following, writes = {}, {}
            for role in ROLES:
                module = next(modules)
                if block in job.component_layers:
                    writes[role] = hidden[role].new_empty((len(COMPONENTS), *hidden[role].shape))
                following[role] = models[role].run_block(block, module, hidden[role], real, contexts[role],
                                                         writes.get(role))
                models[role].free(module)
                del module
            _finish_state(job, store, shard, block + 1, following, hidden, writes)
            hidden = following
            # Both blocks' forward working sets are freed: give their pages back now, or
            # glibc's reuse of fragmented heap grows the run's memory block after block.
            trim_heap()
            bar.update(1)
    rows = [store.get(Kind.STATE_METRICS, shard=shard, state=state) for state in job.states]
    metrics = stack_state_rows(rows)
    if job.component_layers:
        # Block l's writes were stored with state l + 1, its output.
        metrics.update(stack_rows([store.get(Kind.STATE_METRICS, shard=shard, state=layer + 1)
                                   for layer in job.component_layers], COMPONENT_KEYS))
    if heads is not None:
        metrics.update(_streamed_logit_lens(job, store, heads, models["base"].n_layers, shard, real))
    put_streamed_sums(job, store, shard)
    store.put(Kind.METRICS, metrics, shard=shard)
    store.drop(Kind.STATE_METRICS, shard=shard)
    steered = steering_states(job)
    for role in ROLES:
        for key in store.keys(Kind.STATE, role=role, shard=shard):
            if not (job.keep_states and key.state in job.states) and key.state not in steered[role]:
                store.drop(Kind.STATE, role=role, shard=shard, state=key.state)
        if job.keep_states:
            store.put(Kind.KEPT, {"n_layers": models[role].n_layers, "states": list(job.states)},
                      role=role, shard=shard)


def _streamed_logit_lens(job: Job, store: Store, heads: dict[str, Head], n_layers: int, shard: int,
                         real: Tensor) -> dict[str, Tensor]:
    """The logit lens of a finished shard, from the heads read before the first block and the lensed
    states kept in the store (each read back once)."""
    with lens_progress(job, shard) as on_layer:
        def read_state(role: str, state: int) -> Tensor:
            return store.get(Kind.STATE, role=role, shard=shard, state=state)

        return logit_lens_metrics(heads, read_state, job.lens_layers, n_layers, real, budget=job.lens_chunk_bytes,
                                  states_in_memory=False, on_layer=on_layer)


def _finish_state(
    job: Job, store: Store, shard: int, state: int,
    current: dict[str, Float[Tensor, "prompt pos d_model"]],
    previous: dict[str, Float[Tensor, "prompt pos d_model"]] | None,
    writes: dict[str, Float[Tensor, "component prompt pos d_model"]] | None = None,
) -> None:
    """Store state ``state``'s metrics (with the sublayer metrics of the block that wrote it, from
    ``writes``), then both models' state (the new resume point), then drop the state before it
    unless it is kept (``--save-residuals``, the logit lens, the steering check). The order makes
    every resume point complete."""
    if state in job.states:
        before = (previous["base"], previous["sft"]) if previous is not None and state - 1 in job.states else None
        metrics = one_state_metrics(current["base"], current["sft"], before)
        if writes:
            metrics.update(block_component_metrics(writes["base"], writes["sft"]))
        metrics.update(state_sums(job, shard, state, current["base"], current["sft"]))
        # The state's spill for the difference lens's top positions, before the metrics that carry its sums.
        put_units(job, store, shard, state, current["base"], current["sft"])
        store.put(Kind.STATE_METRICS, metrics, shard=shard, state=state)
    for role in ROLES:
        store.put(Kind.STATE, current[role], role=role, shard=shard, state=state)
    kept = (job.keep_states and state - 1 in job.states) or state - 1 in lens_states(job)
    steered = steering_states(job)
    for role in ROLES:
        if state > 0 and not kept and state - 1 not in steered[role]:
            store.drop(Kind.STATE, role=role, shard=shard, state=state - 1)
