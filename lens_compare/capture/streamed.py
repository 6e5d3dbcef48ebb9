"""One model run layer-major from its safetensors checkpoint: each block read once, for every prompt.

``StreamedModel`` builds the model's skeleton on the meta device, embeds every prompt,
builds the causal masks and rotary embeddings once per forward batch, and then, block
by block, reads the block's tensors from the checkpoint straight to the run device
(FP8 dequantized, per-expert tensors fused, each cast to the dtype the modelling code
gives it), materialises the block (``load_state_dict(assign=True)``), pushes every
prompt's hidden state through it and frees it (``to_empty(device="meta")``). Only one
block's weights (two while the next is prefetched) are ever in memory, and each
checkpoint byte is read once however many prompts there are.

The states are exactly what the TransformerBridge capture sees: the input of block i
is ``blocks.{i}.hook_resid_pre``, the output of the last block is the last
``hook_resid_post`` (before the final norm). Attention is eager, as under the bridge.
Position ids are ``0..width-1`` as HF's forward uses without a cache; padding positions
are zero in every stored state, as in ``lens_compare.capture.states``.

What differs between families (where the blocks sit, the embeddings, which mask each
block takes, fused experts) is data: ``StreamRule`` in ``lens_compare/models/families.py``.
"""

import copy
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.capture.head import Head
from lens_compare.errors import CaptureError, CheckpointError
from lens_compare.metrics.states import ResidualStates
from lens_compare.models.checkpoint import SafetensorsCheckpoint, TensorHeader
from lens_compare.models.families import StreamRule, stream_rule
from lens_compare.models.fp8 import FP8_DTYPES, dequantize, expected_scale_shape, fp8_layout, scale_name
from lens_compare.models.load_options import LoadOptions
from lens_compare.util.dtypes import TORCH_DTYPES
from lens_compare.util.hooks import COMPONENTS

_FP8_HEADER_DTYPES = ("F8_E4M3", "F8_E5M2")


@dataclass(frozen=True)
class TensorRecipe:
    """How one tensor of a module's state dict is made from checkpoint tensors.

    ``parts[e]`` lists the checkpoint tensors concatenated along dim 0 for slice ``e``;
    ``stacked`` stacks the slices along a new dim 0 (fused experts), else ``parts`` has
    one slice of one tensor.
    """

    target: str
    parts: tuple[tuple[str, ...], ...]
    stacked: bool
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def names(self) -> list[str]:
        return [name for part in self.parts for name in part]


@dataclass(frozen=True)
class BatchContext:
    """What every block needs for one forward batch, built once: rows, width, masks, positions."""

    start: int
    stop: int
    width: int
    masks: dict[str, Any]
    position_ids: Int[Tensor, "one pos"]
    position_embeddings: tuple[Tensor, Tensor] | None


def _skeleton(config, dtype: torch.dtype):
    """The whole model on the meta device (buffers such as ``inv_freq`` stay real), eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    # Native FP8 weights are dequantized as they stream: the skeleton holds plain modules.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


class StreamedModel:
    """One side of a pair, run block by block (see the module docstring).

    ``open`` reads only headers; ``validate`` checks every tensor the run will read.
    """

    def __init__(self, role: str, spec: str, config, options: LoadOptions, checkpoint: SafetensorsCheckpoint):
        self.role = role
        self.spec = spec
        self.config = config
        self.device = torch.device(options.device)
        self.dtype = TORCH_DTYPES[options.dtype]
        self.rule: StreamRule = stream_rule(config.model_type)
        self.checkpoint = checkpoint
        self.fp8 = fp8_layout(_quantization_config(config))
        self.model = _skeleton(config, self.dtype)
        self.base = getattr(self.model, self.model.base_model_prefix)
        self.prefix = self.model.base_model_prefix
        self.blocks = getattr(self.base, self.rule.blocks)
        self.n_layers = len(self.blocks)
        if self.rule.rotary is not None:
            getattr(self.base, self.rule.rotary).to(self.device)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size if hasattr(self.config, "hidden_size") else self.config.n_embd)

    @classmethod
    def open(cls, role: str, ref, config, options: LoadOptions) -> "StreamedModel":
        if options.quantization is not None or options.split:
            raise CheckpointError(
                f"{role} model {ref.spec!r}: streaming runs the checkpoint's own weights on one device; "
                f"it cannot also be {'NF4' if options.quantization else 'split over GPUs'}"
            )
        return cls(role, ref.spec, config, options, SafetensorsCheckpoint.open(ref))

    # -- which checkpoint tensors make each module -------------------------------------

    def _name(self, relative: str) -> str:
        """The checkpoint's name for a tensor of the base model (with or without its prefix)."""
        prefixed = f"{self.prefix}.{relative}"
        if prefixed in self.checkpoint or relative not in self.checkpoint:
            return prefixed
        return relative

    def recipes(self, module_path: str) -> list[TensorRecipe]:
        """Recipes for every tensor in the state dict of the base model's ``module_path``."""
        module = self.base.get_submodule(module_path)
        merges = {merge.target: merge for merge in self.rule.expert_merges}
        out = []
        for key, tensor in module.state_dict(keep_vars=True).items():
            shape, dtype = tuple(tensor.shape), tensor.dtype
            merge = merges.get(key)
            if merge is not None and self._name(f"{module_path}.{key}") not in self.checkpoint:
                count = int(getattr(self.config, merge.count_field))
                parts = tuple(
                    tuple(self._name(f"{module_path}.{source.format(expert=e)}") for source in merge.sources)
                    for e in range(count)
                )
                out.append(TensorRecipe(key, parts, True, shape, dtype))
            else:
                out.append(TensorRecipe(key, ((self._name(f"{module_path}.{key}"),),), False, shape, dtype))
        return out

    def block_path(self, block: int) -> str:
        return f"{self.rule.blocks}.{block}"

    def embedding_paths(self) -> list[str]:
        return [p for p in (self.rule.token_embedding, self.rule.position_embedding) if p is not None]

    def validate(self, n_blocks: int) -> None:
        """Every tensor the embeddings and the first ``n_blocks`` blocks need: present, and the
        shape the config implies (FP8 scales on the right grid). Reads headers only."""
        paths = self.embedding_paths() + [self.block_path(b) for b in range(n_blocks)]
        for path in paths:
            for recipe in self.recipes(path):
                missing = [name for name in recipe.names if name not in self.checkpoint]
                if missing:
                    raise CheckpointError(
                        f"{self.role} model {self.spec!r}: tensor {missing[0]!r} (for {path}.{recipe.target}) is "
                        f"not in the checkpoint's weight map; the checkpoint does not match its config.json"
                    )
                headers = self.checkpoint.headers(recipe.names)
                expected = _part_shape(recipe)
                for name in recipe.names:
                    self._check_header(name, headers[name], expected)

    def _check_header(self, name: str, header: TensorHeader, expected: tuple[int, ...]) -> None:
        if header.shape != expected:
            raise CheckpointError(
                f"{self.role} model {self.spec!r}: tensor {name!r} has shape {list(header.shape)} in the "
                f"checkpoint but the config implies {list(expected)}; the checkpoint does not match its config.json"
            )
        if header.dtype not in _FP8_HEADER_DTYPES:
            return
        if self.fp8 is None:
            raise CheckpointError(
                f"{self.role} model {self.spec!r}: tensor {name!r} is {header.dtype} but config.json declares no "
                "FP8 quantization_config, so its scales cannot be found"
            )
        layout, block = self.fp8
        scale = scale_name(name, layout)
        if scale not in self.checkpoint:
            raise CheckpointError(f"{self.role} model {self.spec!r}: FP8 tensor {name!r} has no scale {scale!r}")
        found = self.checkpoint.headers([scale])[scale].shape
        want = expected_scale_shape(header.shape, layout, block)
        if tuple(found) != want:
            raise CheckpointError(
                f"{self.role} model {self.spec!r}: FP8 scale {scale!r} has shape {list(found)}, expected "
                f"{list(want)} for a {list(header.shape)} weight in {block[0]} x {block[1]} blocks"
            )

    # -- reading and freeing modules ---------------------------------------------------

    def read_state_dict(self, module_path: str) -> dict[str, Tensor]:
        """``module_path``'s tensors from the checkpoint, on the run device, in their run dtypes.

        One checkpoint tensor at a time: each is read, converted into its place and freed
        (fused experts fill a preallocated tensor slice by slice), so the device holds the
        module in its run dtype plus one tensor as stored, never the whole module twice."""
        state = {}
        with self.checkpoint.reader(self.device) as get:
            for recipe in self.recipes(module_path):
                if not recipe.stacked and len(recipe.parts[0]) == 1:
                    state[recipe.target] = self._converted(get, recipe.parts[0][0], recipe.dtype)
                    continue
                target = torch.empty(recipe.shape, dtype=recipe.dtype, device=self.device)
                slices = target if recipe.stacked else target[None]
                for index, part in enumerate(recipe.parts):
                    row = 0
                    for name in part:
                        piece = self._converted(get, name, recipe.dtype)
                        slices[index, row:row + piece.shape[0]] = piece
                        row += piece.shape[0]
                        del piece
                state[recipe.target] = target
        return state

    def _converted(self, get, name: str, dtype: torch.dtype) -> Tensor:
        """One checkpoint tensor in ``dtype`` (FP8 dequantized with its scales)."""
        tensor = get(name)
        if tensor.dtype in FP8_DTYPES:
            layout, block = self.fp8
            return dequantize(tensor, get(scale_name(name, layout)), layout, block, dtype)
        return tensor.to(dtype)

    def materialise(self, module_path: str, state: dict[str, Tensor]) -> torch.nn.Module:
        module = self.base.get_submodule(module_path)
        module.load_state_dict(state, assign=True, strict=True)
        # Buffers outside the state dict (none in today's families) follow the weights.
        for sub in module.modules():
            for key, buffer in sub._buffers.items():
                if buffer is not None and buffer.device != self.device and not buffer.is_meta:
                    sub._buffers[key] = buffer.to(self.device)
        return module

    def load(self, module_path: str) -> torch.nn.Module:
        return self.materialise(module_path, self.read_state_dict(module_path))

    @staticmethod
    def free(module: torch.nn.Module) -> None:
        module.to_empty(device="meta")

    # -- running ---------------------------------------------------------------------

    def read_head(self) -> Head:
        """The final norm and the unembedding, read from the checkpoint to the run device (the
        logit lens, after the last block). A tied unembedding is the token embedding's matrix."""
        norm = self.load(self.rule.final_norm)
        output = self.model.get_output_embeddings()
        path = next(name for name, module in self.model.named_modules() if module is output)
        names = {key: f"{path}.{key}" for key in ("weight", "bias") if getattr(output, key, None) is not None}
        if names["weight"] not in self.checkpoint:
            if not getattr(self.config, "tie_word_embeddings", False):
                raise CheckpointError(f"{self.role} model {self.spec!r}: the unembedding {names['weight']!r} is "
                                      "not in the checkpoint and the config does not tie it to the embedding")
            names["weight"] = self._name(f"{self.rule.token_embedding}.weight")
        with self.checkpoint.reader(self.device) as get:
            tensors = {key: self._converted(get, name, self.dtype) for key, name in names.items()}
        return Head(norm, tensors["weight"], tensors.get("bias"))

    def read_final_norm_weight(self) -> Tensor | None:
        """The last ``*norm.weight`` of the model (its final norm), as the weights fingerprint hashes it."""
        names = [name for name, _ in self.base.named_parameters() if name.endswith("norm.weight")]
        if not names:
            return None
        name = self._name(names[-1])
        tensor = self.checkpoint.read([name], "cpu")[name]
        return tensor.to(dict(self.base.named_parameters())[names[-1]].dtype)

    def embed(
        self, token_ids: Int[Tensor, "prompt pos"], batches: list[tuple[int, int, int]],
        on_embedding=None,
    ) -> Float[Tensor, "prompt pos d_model"]:
        """Every prompt's input to block 0, on the host (positions past a batch's width are zero).

        ``on_embedding(weight)`` sees the token embedding matrix while it is loaded."""
        modules = {path: self.load(path) for path in self.embedding_paths()}
        token = modules[self.rule.token_embedding]
        if on_embedding is not None:
            on_embedding(token.weight)
        n_prompts, width = token_ids.shape
        out = torch.zeros((n_prompts, width, self.d_model), dtype=self.dtype)
        with torch.no_grad():
            for start, stop, batch_width in batches:
                ids = token_ids[start:stop, :batch_width].to(self.device)
                h = token(ids)
                if self.rule.position_embedding is not None:
                    positions = torch.arange(batch_width, device=self.device)[None]
                    h = h + modules[self.rule.position_embedding](positions)
                out[start:stop, :batch_width] = h.to("cpu", self.dtype)
        for module in modules.values():
            self.free(module)
        return out

    def contexts(
        self, hidden: Float[Tensor, "prompt pos d_model"], real: Bool[Tensor, "prompt pos"],
        batches: list[tuple[int, int, int]],
    ) -> list[BatchContext]:
        """Masks (one per attention kind the blocks use) and position embeddings per batch."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        out = []
        with torch.no_grad():
            for start, stop, width in batches:
                h = hidden[start:stop, :width].to(self.device)
                positions = torch.arange(width, device=self.device)[None]
                kwargs = dict(config=self.model.config, inputs_embeds=h,
                              attention_mask=real[start:stop, :width].long().to(self.device), cache=None,
                              position_ids=positions)
                masks = {"full_attention": create_causal_mask(**kwargs)}
                if self.rule.masks == "sliding_window" and getattr(self.config, "sliding_window", None):
                    masks = {"full_attention": create_sliding_window_causal_mask(**kwargs)}
                elif self.rule.masks == "layer_types" and "sliding_attention" in (self.config.layer_types or ()):
                    masks["sliding_attention"] = create_sliding_window_causal_mask(**kwargs)
                rotary = None
                if self.rule.rotary is not None:
                    rotary = getattr(self.base, self.rule.rotary)(h, positions)
                out.append(BatchContext(start, stop, width, masks, positions, rotary))
        return out

    def mask_kind(self, block: int) -> str:
        if self.rule.masks == "layer_types":
            return self.config.layer_types[block]
        return "full_attention"

    def run_block(
        self, block: int, module: torch.nn.Module, hidden: Float[Tensor, "prompt pos d_model"],
        real: Bool[Tensor, "prompt pos"], contexts: list[BatchContext],
        components: Float[Tensor, "component prompt pos d_model"] | None = None,
    ) -> Float[Tensor, "prompt pos d_model"]:
        """Every prompt through one materialised block; the output on the host, padding zeroed.

        ``components``, when given, receives the block's attention and MLP outputs
        (``COMPONENTS`` order), read by forward hooks on its HF modules; padding zeroed."""
        out = torch.zeros_like(hidden)
        kind = self.mask_kind(block)
        writes: dict[int, Tensor] = {}
        handles = []
        if components is not None:
            components.zero_()
            for index, name in enumerate((self.rule.attention, self.rule.mlp)):
                def keep(_module, _args, output, index=index):
                    writes[index] = output[0] if isinstance(output, tuple) else output
                handles.append(module.get_submodule(name).register_forward_hook(keep))
        try:
            with torch.no_grad():
                for ctx in contexts:
                    h = hidden[ctx.start:ctx.stop, :ctx.width].to(self.device)
                    kwargs: dict[str, Any] = dict(attention_mask=ctx.masks[kind], position_ids=ctx.position_ids,
                                                  use_cache=False)
                    if ctx.position_embeddings is not None:
                        kwargs["position_embeddings"] = ctx.position_embeddings
                    result = module(h, **kwargs)
                    result = result.to("cpu")
                    for index, written in writes.items():
                        components[index, ctx.start:ctx.stop, :ctx.width] = written.to("cpu")
                    writes.clear()
                    self._check_finite(block, ctx, result, real)
                    out[ctx.start:ctx.stop, :ctx.width] = result
        finally:
            for handle in handles:
                handle.remove()
        out.masked_fill_(~real[..., None], 0)
        if components is not None:
            components.masked_fill_(~real[None, ..., None], 0)
        return out

    def _check_finite(self, block: int, ctx: BatchContext, result: Tensor, real: Bool[Tensor, "prompt pos"]) -> None:
        batch_real = real[ctx.start:ctx.stop, :ctx.width]
        bad = (~torch.isfinite(result)).any(dim=-1) & batch_real
        if bad.any():
            prompt = ctx.start + int(bad.any(dim=1).nonzero()[0])
            raise CaptureError(
                f"{self.role} model {self.spec!r}: block {block} produced non-finite values for prompt "
                f"{prompt}; stopping before any metric of it is written (check the dtype: float16 "
                "overflows where bfloat16 does not)"
            )


def _quantization_config(config) -> dict[str, Any] | None:
    found = getattr(config, "quantization_config", None)
    if found is None:
        return None
    return found if isinstance(found, dict) else found.to_dict()


def _part_shape(recipe: TensorRecipe) -> tuple[int, ...]:
    """The shape of each checkpoint tensor of ``recipe``."""
    shape = recipe.shape[1:] if recipe.stacked else recipe.shape
    per_part = len(recipe.parts[0])
    if shape[0] % per_part:
        raise CheckpointError(f"{recipe.target}: {shape[0]} rows do not split into {per_part} parts")
    return (shape[0] // per_part, *shape[1:])


def forward_batches(real: Bool[Tensor, "prompt pos"], batch_size: int) -> list[tuple[int, int, int]]:
    """``(start, stop, width)`` per forward batch; ``width`` reaches the batch's last real token
    (so right and left padding both work)."""
    out = []
    positions = torch.arange(real.shape[1])
    for start in range(0, real.shape[0], batch_size):
        stop = min(start + batch_size, real.shape[0])
        last = int((positions[None] * real[start:stop]).max()) + 1
        out.append((start, stop, last))
    return out


def stream_states(
    role: str, ref, config, options: LoadOptions, token_ids: Int[Tensor, "prompt pos"],
    real: Bool[Tensor, "prompt pos"], states: tuple[int, ...], *, batch_size: int,
    component_layers: tuple[int, ...] = (),
) -> ResidualStates:
    """One model's residual ``states`` for every prompt, streamed (what ``capture_states`` gives
    through TransformerBridge). The pair engine runs two models in lockstep instead."""
    model = StreamedModel.open(role, ref, config, options)
    n_blocks = max(states)
    if n_blocks > model.n_layers or min(states) < 0:
        raise CaptureError(f"{role}: states {states} outside 0..{model.n_layers}")
    model.validate(n_blocks)
    batches = forward_batches(real, batch_size)
    hidden = model.embed(token_ids, batches)
    hidden.masked_fill_(~real[..., None], 0)
    contexts = model.contexts(hidden, real, batches)
    kept = {0: hidden} if 0 in states else {}
    parts = {}
    for block in range(n_blocks):
        module = model.load(model.block_path(block))
        if block in component_layers:
            parts[block] = hidden.new_empty((len(COMPONENTS), *hidden.shape))
        hidden = model.run_block(block, module, hidden, real, contexts, parts.get(block))
        model.free(module)
        if block + 1 in states:
            kept[block + 1] = hidden
    values = torch.stack([kept[state] for state in states])
    components = torch.stack([parts[layer] for layer in component_layers]) if component_layers else None
    return ResidualStates(n_layers=model.n_layers, states=tuple(states), values=values,
                          component_layers=tuple(component_layers), components=components)


@contextmanager
def prefetched(loads: list[Callable[[], torch.nn.Module]]) -> Iterator[Iterator[torch.nn.Module]]:
    """Yield the modules ``loads`` make, in order; the next one is read on a background thread
    while the caller computes with the current one (so at most two are materialised)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lens_compare-read")
    pending = []

    def modules() -> Iterator[torch.nn.Module]:
        if not loads:
            return
        pending.append(executor.submit(loads[0]))
        for index in range(len(loads)):
            module = pending.pop().result()
            if index + 1 < len(loads):
                pending.append(executor.submit(loads[index + 1]))
            yield module

    try:
        yield modules()
    finally:
        for future in pending:
            future.cancel()
        executor.shutdown(wait=True)
