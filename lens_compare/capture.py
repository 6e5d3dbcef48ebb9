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
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.errors import CaptureError
from lens_compare.hooks import HookKind, state_hook_name, state_index


@dataclass(frozen=True)
class ResidualStates:
    """One model's distinct residual states; ``resid_pre``/``resid_post`` are views.

    ``states[i]`` is the state index held in ``values[i]`` (state ``s`` is the input of
    block ``s``; state ``n_layers`` is the output of the last block). Padding
    positions hold zeros.
    """

    n_layers: int
    states: tuple[int, ...]
    values: Float[Tensor, "state prompt pos d_model"]

    def view(self, kind: HookKind, layer: int) -> Float[Tensor, "prompt pos d_model"]:
        state = state_index(kind, layer)
        if state not in self.states:
            raise CaptureError(f"{kind} of layer {layer} was not captured (states held: {self.states})")
        return self.values[self.states.index(state)]

    def resid_pre(self, layer: int) -> Float[Tensor, "prompt pos d_model"]:
        return self.view("resid_pre", layer)

    def resid_post(self, layer: int) -> Float[Tensor, "prompt pos d_model"]:
        return self.view("resid_post", layer)


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
) -> ResidualStates:
    """Run all prompts through ``bridge`` in right-padded batches and keep ``states``.

    ``on_batch(n)`` is called after each batch with its number of prompts (progress).
    """
    n_layers = bridge.cfg.n_layers
    if not states or max(states) > n_layers or min(states) < 0:
        raise CaptureError(f"{label}: states {states} outside 0..{n_layers}")
    names = [state_hook_name(n_layers, state) for state in states]
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
                _, cache = bridge.run_with_cache(
                    token_ids[start:stop, :batch_width].to(device),
                    attention_mask=batch_mask[:, :batch_width].long().to(device),
                    names_filter=names,
                    return_cache_object=False,
                    device="cpu",
                    **extra,
                )
            missing = [name for name in names if name not in cache]
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
            for row, name in enumerate(names):
                values[row, start:stop, :batch_width] = cache[name]
            values[:, start:stop, batch_width:] = 0
            padding = ~batch_mask[:, :batch_width]
            if padding.any():
                values[:, start:stop, :batch_width][:, padding] = 0
            if on_batch is not None:
                on_batch(stop - start)
    return ResidualStates(n_layers=n_layers, states=states, values=values)
