"""The TransformerBridge engines: ``resident`` and ``sequential``, on one device, split or NF4.

``resident`` loads both models and runs every pending shard through each. ``sequential``
loads the base model once, runs every pending shard and spills its residual states to
the store (a run folder on disk for the CLI), frees it completely, then loads the SFT
model once and compares shard by shard against the spilled states. So each model is
loaded once per run however many shards there are, and only one model's weights are
ever in memory.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm import tqdm

from lens_compare.analyses.components import component_metrics
from lens_compare.analyses.logit_lens import logit_lens_metrics
from lens_compare.capture.head import Head, head_of
from lens_compare.capture.states import boot_bridge, capture_states
from lens_compare.engines.difference import put_readings, put_sums, readings_due
from lens_compare.engines.job import Job, lens_progress
from lens_compare.engines.store import Kind, Store
from lens_compare.metrics.per_token import state_metrics
from lens_compare.metrics.states import ResidualStates
from lens_compare.models.facts import ModelFacts, model_facts
from lens_compare.models.families import final_norm_path
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.loading import load_hf_model, weights_fingerprint
from lens_compare.models.placement import model_device_map, summarize_placement
from lens_compare.util.host_memory import release_host_memory
from lens_compare.util.progress import progress_bar

logger = logging.getLogger("lens_compare")


class LoadedModel:
    """One model of the pair, loaded and wrapped; ``close()`` drops every reference to it."""

    def __init__(self, role: str, hf_model, bridge, facts: ModelFacts, head: Head | None = None):
        self.role = role
        self.hf_model = hf_model
        self.bridge = bridge
        self.facts = facts
        # The final norm and unembedding (the logit lens): views of the model's weights, dropped by
        # close() with the rest (a run that keeps a head past its model keeps a ``detached()`` copy).
        self.head = head

    def capture(self, job: Job, shard: int, on_batch: Callable[[int], None] | None) -> ResidualStates:
        token_ids, real = job.shard_inputs(shard)
        states = capture_states(self.bridge, token_ids, real, job.states, batch_size=job.batch_size,
                                label=self.role, on_batch=on_batch, component_layers=job.component_layers)
        release_host_memory()
        return states

    def close(self) -> None:
        self.hf_model = None
        self.bridge = None
        self.head = None
        release_host_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _quantization_facts(options: LoadOptions) -> dict[str, Any] | None:
    if options.quantization is None:
        return None
    from lens_compare.models.quantization import quantization_facts

    return quantization_facts(options)


def open_model(job: Job, side) -> LoadedModel:
    """Load ``side`` as ``job.loads`` says, with what it learns from the weights (``facts``) and,
    for the logit lens, its head; ``close()`` frees it."""
    options = job.loads[side.role]
    logger.info("loading %s model %s (%s): %s", side.role, side.ref, side.ref.kind, options.describe())
    hf_model = load_hf_model(side.ref, job.model_configs[side.role], options)
    # Before the bridge wraps the modules (and renames the final norm's weight).
    fingerprint = weights_fingerprint(hf_model)
    head = None
    if job.logit_lens:
        head = head_of(hf_model, final_norm_path(hf_model.config.model_type))
        head = head.shared(job.lens_vocab) if job.lens_vocab else head
    bridge = boot_bridge(hf_model, side.ref, job.tokenizers[side.role], options)
    facts = model_facts(
        side.role, hf_model.get_input_embeddings().weight, job.prompt_ids, fingerprint=fingerprint,
        load=options.describe(), quantization=_quantization_facts(options), base_lacks=job.base_lacks,
        placement=summarize_placement(hf_model, model_device_map(hf_model), [block.name for block in bridge.blocks]),
    )
    return LoadedModel(side.role, hf_model, bridge, facts, head)


@contextmanager
def loaded(job: Job, side, store: Store) -> Iterator[LoadedModel]:
    """Load ``side`` as ``job.loads`` says, record its facts in ``store``, free it on exit."""
    model = open_model(job, side)
    store.put(Kind.FACTS, model.facts.to_dict(), role=side.role)
    try:
        yield model
    finally:
        model.close()


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
