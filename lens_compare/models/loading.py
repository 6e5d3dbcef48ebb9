"""Load a model reference (``lens_compare.models.refs``) as a TransformerBridge with raw weights.

``resolve_ref`` resolves every kind of reference, ``demo:NAME`` included. A demo
checkpoint's config and tokenizer are read from its recipe's source model until it is
built (the fine-tune changes neither); its weights are read once it is built, which the
pipeline does before any model loads (``lens_compare.demo.fine_tune``).

The bridge is booted from an HF model loaded here (``hf_model=``) with eager
attention, in the requested dtype, with no LayerNorm folding or weight centring:
we compare the streams the models really compute.
"""

import hashlib
from pathlib import Path
from typing import Any

import torch

from lens_compare.errors import ModelLoadError
from lens_compare.models.demo_recipes import PREFIX as DEMO_PREFIX
from lens_compare.models.demo_recipes import demo_ref, recipe_for
from lens_compare.models.hub import hub_reachable
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.refs import ModelRef, resolve_plain_ref
from lens_compare.util.dtypes import TORCH_DTYPES
from lens_compare.util.progress import gguf_bar_quiet_in_notebook


def resolve_ref(spec: str) -> ModelRef:
    """Classify a reference and check local files exist, without loading anything."""
    if isinstance(spec, str) and spec.startswith(DEMO_PREFIX):
        return demo_ref(spec)
    return resolve_plain_ref(spec)


def files_ref(ref: ModelRef) -> ModelRef:
    """Where ``ref``'s config and tokenizer are read: a demo checkpoint's own files once built,
    its recipe's source model before; a GGUF's, from the cache (``lens_compare.models.gguf``)."""
    if ref.kind == "gguf":
        from lens_compare.models.gguf import files_dir

        return ModelRef(ref.spec, "dir", str(files_dir(ref)))
    if ref.kind != "demo":
        return ref
    if Path(ref.location).is_dir():
        return ModelRef(ref.spec, "dir", ref.location)
    return resolve_plain_ref(recipe_for(ref.spec).source)


def weights_ref(ref: ModelRef) -> ModelRef:
    """``ref`` as the files its weights are read from: a demo checkpoint's directory, which must
    be built (``lens_compare.demo.fine_tune.demo_checkpoint``; a run builds it before loading)."""
    if ref.kind != "demo":
        return ref
    if not Path(ref.location).is_dir():
        raise ModelLoadError(
            f"model {ref.spec!r}: the demo checkpoint is not built yet; build it with "
            f"`python -m lens_compare.demo_ft {ref.spec.removeprefix(DEMO_PREFIX)}` (a run builds it itself)"
        )
    return ModelRef(ref.spec, "dir", ref.location)


def _load_failure(ref: ModelRef, what: str, error: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"cannot load the {what} of {ref.spec!r}: {type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}"
        + ((" (huggingface.co cannot be reached and the model is not in the local cache: download it "
            "where there is network, `hf download ...`, or pass a local directory)" if not hub_reachable()
            else " (hub ids need network access and, for gated models, `hf auth login`)")
           if ref.kind == "hub" else "")
    )


def load_config(ref: ModelRef):
    from transformers import AutoConfig

    ref = files_ref(ref)
    try:
        return AutoConfig.from_pretrained(ref.location, **ref.file_kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise _load_failure(ref, "config", error) from error


def load_tokenizer(ref: ModelRef, name: str | None = None, **kwargs: Any):
    """The tokenizer of ``ref`` (or of ``name``, a local_run override)."""
    from transformers import AutoTokenizer

    source = resolve_ref(name) if name else files_ref(ref)
    try:
        return AutoTokenizer.from_pretrained(source.location, **source.file_kwargs, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise _load_failure(source, "tokenizer", error) from error


def context_length(config) -> int | None:
    """The model's trained context, from whichever field its config uses."""
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_hf_model(ref: ModelRef, config, options: LoadOptions):
    """The HF causal LM with eager attention (TransformerLens runs eager; so must the reference),
    placed and quantized as ``options`` says."""
    from transformers import AutoModelForCausalLM

    ref = weights_ref(ref)
    placement: dict[str, Any] = {}
    if options.device_map is not None:
        placement["device_map"] = dict(options.device_map)
        if options.max_memory is not None:
            placement["max_memory"] = dict(options.max_memory)
        if options.offload_folder is not None:
            placement["offload_folder"] = options.offload_folder
    elif options.device != "cpu":
        placement["device_map"] = {"": options.device}

    def source() -> tuple[str, dict[str, Any]]:
        """Where ``from_pretrained`` reads the weights, and its arguments (called only when needed:
        a cached NF4 model reads neither)."""
        location, kwargs = weights_source(ref, config, options)
        return location, {**kwargs, **placement, **options.model_kwargs}

    try:
        with gguf_bar_quiet_in_notebook():
            if options.quantization is not None:
                from lens_compare.models.quantization import load_quantized

                model = load_quantized(ref, source, options)
            else:
                location, kwargs = source()
                model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise _load_failure(ref, "weights", error) from error
    return model.eval()


def weights_source(ref: ModelRef, config, options: LoadOptions) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads ``ref``'s weights in ``options.dtype``, with eager attention:
    a GGUF through its dequantized copy in the cache (``lens_compare.models.gguf``, written on first use),
    or the GGUF itself, dequantized as it loads, when the cache has no room for it."""
    kwargs: dict[str, Any] = {"config": config, "dtype": TORCH_DTYPES[options.dtype], "attn_implementation": "eager"}
    if not ref.gguf_file:
        return ref.location, {**kwargs, **ref.file_kwargs}
    from lens_compare.models.gguf import weights_dir

    converted = weights_dir(ref, config, options.model_kwargs)
    if converted is not None:
        return str(converted), kwargs
    from transformers import GgufConfig

    # Plain dense modules: the bridge hooks nn.Linear-shaped blocks, not packed kernels.
    return ref.location, {**kwargs, **ref.file_kwargs, "quantization_config": GgufConfig(dequantize=True)}


def weights_fingerprint(hf_model, chunk_bytes: int = 64 * 2**20) -> str:
    """sha256 of the input embedding and the last ``*norm.weight`` (the final norm where a
    family names it so): cheap, and differs between checkpoints. A streamed run hashes the
    same two tensors as it reads them (``fingerprint_tensors``), so the value is the same.
    """
    tensors = [hf_model.get_input_embeddings().weight]
    tensors += [p for name, p in hf_model.named_parameters() if name.endswith("norm.weight")][-1:]
    return fingerprint_tensors(tensors, chunk_bytes)


def fingerprint_tensors(tensors: list[torch.Tensor], chunk_bytes: int = 64 * 2**20) -> str:
    """sha256 (16 hex digits) of ``tensors``' bytes, hashed a slice at a time straight from the
    tensor's memory (one slice is copied to the host for a GPU tensor): a 2 GiB embedding
    never gets a second copy."""
    digest = hashlib.sha256()
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, chunk_bytes // flat.element_size())
        for start in range(0, flat.numel(), step):
            piece = flat[start : start + step].cpu().contiguous()
            digest.update(piece.view(torch.uint8).numpy())
    return digest.hexdigest()[:16]
