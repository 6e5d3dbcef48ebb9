"""Capture every residual state of one model, for all prompts, with ``run_with_cache``.

Only the hooks of the distinct states are cached (``names_filter``), never the
full cache: attention patterns would dominate memory. States land on the CPU in
the model's dtype as soon as each hook fires. No logits are needed, so the model
unembeds the last position only (``logits_to_keep=1`` where its forward takes it): the
full ``[batch, pos, vocab]`` logits were the largest tensor of the forward (1 GiB for a
128k vocabulary at 8 x 250 tokens in float32) and a fifth of SmolLM2's FLOPs.
"""

import inspect
import warnings
from collections.abc import Callable

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lens_compare.capture.norm_statistics import skip_unread_norm_statistics
from lens_compare.errors import CaptureError
from lens_compare.metrics.states import ResidualStates
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.refs import ModelRef
from lens_compare.util.dtypes import TORCH_DTYPES
from lens_compare.util.hooks import (
    COMPONENTS,
    component_hook_name,
    state_hook_name,
)


def _takes_logits_to_keep(bridge) -> bool:
    model = getattr(bridge, "original_model", None)
    return model is not None and "logits_to_keep" in inspect.signature(model.forward).parameters


def capture_states(
    bridge,
    token_ids: Int[Tensor, "prompt pos"],
    mask: Bool[Tensor, "prompt pos"],
    states: tuple[int, ...],
    *,
    batch_size: int,
    label: str,
    on_batch: Callable[[int], None] | None = None,
    component_layers: tuple[int, ...] = (),
) -> ResidualStates:
    """Run all prompts through ``bridge`` in right-padded batches and keep ``states``, plus the
    attention and MLP outputs of the blocks ``component_layers``.

    ``on_batch(n)`` is called after each batch with its number of prompts (progress).
    """
    n_layers = bridge.cfg.n_layers
    if not states or max(states) > n_layers or min(states) < 0:
        raise CaptureError(f"{label}: states {states} outside 0..{n_layers}")
    if component_layers and (max(component_layers) >= n_layers or min(component_layers) < 0):
        raise CaptureError(f"{label}: component layers {component_layers} outside 0..{n_layers - 1}")
    names = [state_hook_name(n_layers, state) for state in states]
    part_names = [[component_hook_name(c, layer) for c in COMPONENTS] for layer in component_layers]
    # Where the embedding sits: the only device inputs go to, also on a split model.
    device = torch.device(bridge.cfg.device)
    extra = {"logits_to_keep": 1} if _takes_logits_to_keep(bridge) else {}
    n_prompts, width = token_ids.shape
    values: Tensor | None = None
    with torch.inference_mode():
        for start in range(0, n_prompts, batch_size):
            stop = min(start + batch_size, n_prompts)
            batch_mask = mask[start:stop]
            batch_width = int(batch_mask.sum(dim=1).max())
            with warnings.catch_warnings():
                # On a split model TransformerBridge warns that device= is ignored, yet it
                # still moves each cached tensor there (bridge_core.py, run_with_cache).
                warnings.filterwarnings("ignore", message=r"run_with_cache\(device=.*\) ignored: model is dispatched")
                cache = bridge.run_with_cache(
                    token_ids[start:stop, :batch_width].to(device),
                    attention_mask=batch_mask[:, :batch_width].long().to(device),
                    names_filter=names + [name for pair in part_names for name in pair],
                    return_cache_object=False,
                    device="cpu",
                    **extra,
                )[1]  # the last position's logits are not kept
            missing = [name for name in [*names, *(n for pair in part_names for n in pair)] if name not in cache]
            if missing:
                raise CaptureError(f"{label}: hooks did not fire: {missing}")
            if values is None:
                # A normal tensor (not an inference tensor), so later in-place edits work;
                # every element is written below, so no zero-fill pass is needed.
                with torch.inference_mode(False):
                    values = torch.empty(
                        (len(states), n_prompts, width, cache[names[0]].shape[-1]),
                        dtype=cache[names[0]].dtype,
                    )
                    if part_names:
                        parts = torch.empty((len(component_layers), len(COMPONENTS), *values.shape[1:]),
                                            dtype=values.dtype)
            for row, name in enumerate(names):
                values[row, start:stop, :batch_width] = cache[name]
            padding = ~batch_mask[:, :batch_width]
            _zero_padding(values[:, start:stop], batch_width, padding)
            for row, pair in enumerate(part_names):
                for column, name in enumerate(pair):
                    parts[row, column, start:stop, :batch_width] = cache[name]
                _zero_padding(parts[row, :, start:stop], batch_width, padding)
            # The cache holds this batch's forward tensors: drop them before the next forward
            # runs, not when its cache replaces this one.
            del cache
            if on_batch is not None:
                on_batch(stop - start)
    return ResidualStates(n_layers=n_layers, states=states, values=values, component_layers=tuple(component_layers),
                          components=parts if part_names else None)


def _zero_padding(values: Tensor, batch_width: int, padding: Tensor) -> None:
    """Zero ``values[..., prompt, pos, :]`` past ``batch_width`` and wherever ``padding`` is set."""
    values[:, :, batch_width:] = 0
    if padding.any():
        values[:, :, :batch_width][:, padding] = 0


def boot_bridge(hf_model, ref: ModelRef, tokenizer, options: LoadOptions):
    """Wrap an already-loaded HF model; raw weights, no processing.

    A split model carries its placement (``hf_device_map``); the bridge reads the
    embedding's device from it, so no ``device`` is passed. Its norms skip the statistics
    no hook reads (``lens_compare.capture.norm_statistics``), so a capture costs a bare forward.
    """
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(
        ref.location, hf_model=hf_model, tokenizer=tokenizer,
        device=None if options.split else options.device, dtype=TORCH_DTYPES[options.dtype],
    )
    skip_unread_norm_statistics(bridge)
    return bridge
