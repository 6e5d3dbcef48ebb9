"""NF4 weights: bitsandbytes 4-bit weight-only quantization, applied while a model loads.

Every ``nn.Linear`` except the output head becomes a bitsandbytes ``Linear4bit``
holding NF4 codes (0.5 byte per weight) and one absmax per 64 weights; embeddings,
norms and the head keep the compute dtype. Activations stay in the compute dtype
(the run's ``--dtype``), so residuals are captured exactly as for any other model.
4-bit weights change the residual stream itself: read an NF4 run against the
``smollm2-nf4`` noise-floor pair (the same weights in float32 vs NF4).
"""

import gc
import importlib.util
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lens_compare.errors import ConfigError
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.refs import ModelRef
from lens_compare.util.cache import build_once
from lens_compare.util.dtypes import TORCH_DTYPES
from lens_compare.util.versions import package_version

logger = logging.getLogger("lens_compare")

NF4_BLOCK_SIZE = 64


def require_bitsandbytes() -> None:
    """Refuse an NF4 run at once, before anything loads, when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "the nf4 strategy needs bitsandbytes, which is not installed: "
            "pip install 'lens_compare[nf4]' (or pick --strategy resident/sequential)"
        )


def nf4_config(compute_dtype: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=TORCH_DTYPES[compute_dtype],
        bnb_4bit_use_double_quant=False,
    )


def quantization_facts(options: LoadOptions) -> dict[str, Any]:
    """What the JSON provenance records about a quantized model."""
    on_cpu = options.device == "cpu" and options.device_map is None
    return {
        "loaded_from": "cached NF4 checkpoint (lens_compare cache)" if on_cpu else "quantized while loading",
        "method": "bitsandbytes",
        "quant_type": options.quantization,
        "block_size": NF4_BLOCK_SIZE,
        "double_quant": False,
        "compute_dtype": options.dtype,
        "skipped": "lm_head, embeddings and norms stay in the compute dtype",
        "bitsandbytes": package_version("bitsandbytes"),
    }


def _quiet_bitsandbytes() -> None:
    # On CPUs with AVX512-BF16 bitsandbytes warns at import that a hub kernel package is
    # missing; its pure-torch fallback is what runs, and it is exact.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def nf4_cache_dir(ref: ModelRef, compute_dtype: str) -> Path:
    """The cached NF4 checkpoint of ``ref`` (keyed by its weights' fingerprint)."""
    from lens_compare.models.fingerprint import checkpoint_fingerprint
    from lens_compare.util.cache import cache_root

    version = package_version("bitsandbytes")
    return cache_root() / "nf4" / f"{checkpoint_fingerprint(ref)}-{compute_dtype}-bnb{version}"


def _quantize(source: Callable[[], tuple[str, dict[str, Any]]], options: LoadOptions):
    """Quantize while loading: transformers' bitsandbytes quantizer, NF4 codes from the
    checkpoint's own values; ``source()`` says where the weights are read (``loading.weights_source``)."""
    from transformers import AutoModelForCausalLM

    bnb = nf4_config(options.dtype)
    location, kwargs = source()
    if "gguf_file" not in kwargs:
        return AutoModelForCausalLM.from_pretrained(location, **{**kwargs, "quantization_config": bnb})
    # A GGUF read as it is (no room to cache its dequantized copy): transformers will not combine
    # a GGUF file with a quantization config, so dequantize it, then let the same quantizer load
    # that state dict.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    dense = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    config, state_dict = dense.config, dense.state_dict()
    del dense
    kwargs = {k: v for k, v in kwargs.items() if k not in ("config", "gguf_file", "quantization_config")}
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=state_dict, quantization_config=bnb, **kwargs)


def load_cached(folder: Path, options: LoadOptions):
    """A cached NF4 checkpoint, read with plain reads into the model's own tensors.

    Not memory-mapped: a mapped load leaves the unquantized tensors as views of the
    file while the 4-bit codes are copied out, so every touched page of the file would
    stay resident beside the copies (measured: 0.1 GiB more per SmolLM2 model).
    """
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(str(folder))
    state_dict = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt", backend="pread") as handle:
            state_dict.update({name: handle.get_tensor(name) for name in handle.keys()})
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=state_dict, dtype=TORCH_DTYPES[options.dtype],
                                       attn_implementation="eager", **options.model_kwargs)


def load_quantized(ref: ModelRef, source: Callable[[], tuple[str, dict[str, Any]]], options: LoadOptions):
    """The model with NF4 weights; ``source()`` gives where its weights are read and the loader's
    other ``from_pretrained`` arguments (called only when the model is quantized here).

    On the CPU, where bitsandbytes quantizes at about 10 s per GB of 16-bit weights (two
    cores) and quantizing maps the whole 16/32-bit source into memory, the quantized
    checkpoint is written once to the cache (``nf4_cache_dir``) and every run loads that
    copy: the same NF4 codes, read as 4-bit. On CUDA the GPU quantizes as it loads and
    nothing is cached.
    """
    require_bitsandbytes()
    _quiet_bitsandbytes()
    if options.device != "cpu" or options.device_map is not None:
        model = _quantize(source, options)
    else:
        def build(folder: Path) -> None:
            logger.info("quantizing %s to NF4 once, into %s", ref, folder.parent)
            quantized = _quantize(source, options)
            quantized.save_pretrained(str(folder))
            del quantized
            gc.collect()

        model = load_cached(build_once(nf4_cache_dir(ref, options.dtype), build), options)
    return compute_as_asked(model)


def compute_as_asked(model):
    """``model`` with every bitsandbytes 4-bit layer computing in its own compute dtype, on any CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.45 and later) repacks a ``Linear4bit``'s weights
    at its first forward and computes it in bfloat16, whatever ``bnb_4bit_compute_dtype`` says;
    on a CPU without it, the same model computes in the compute dtype. So the same NF4 model
    gives different numbers on different machines. Every NF4 model lens_compare loads, and every
    NF4 reference its tests build, goes through here: the compute dtype asked for, everywhere.
    Call it before the model's first forward (the repacking happens there). Returns ``model``.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
