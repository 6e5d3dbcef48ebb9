"""One model of the pair, loaded through TransformerBridge as ``job.loads`` says (``open_model``,
``loaded``), with what the run learns from its weights and, for the logit lens, its head."""

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lens_compare.capture.head import Head, head_of
from lens_compare.capture.states import boot_bridge, capture_states
from lens_compare.engines.job import Job
from lens_compare.engines.store import Kind, Store
from lens_compare.metrics.states import ResidualStates
from lens_compare.models.facts import ModelFacts, model_facts
from lens_compare.models.families import final_norm_path
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.loading import load_hf_model, weights_fingerprint
from lens_compare.models.placement import model_device_map, summarize_placement
from lens_compare.util.host_memory import release_host_memory

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
