"""NF4 weights: bitsandbytes 4-bit weight-only quantization, applied while a model loads.

Every ``nn.Linear`` except the output head becomes a bitsandbytes ``Linear4bit``
holding NF4 codes (0.5 byte per weight) and one absmax per 64 weights; embeddings,
norms and the head keep the compute dtype. Activations stay in the compute dtype
(the run's ``--dtype``), so residuals are captured exactly as for any other model.
4-bit weights change the residual stream itself: read an NF4 run against the
``smollm2-nf4`` noise-floor pair (the same weights in float32 vs NF4).
"""

import importlib.util
import logging
from typing import Any

from lens_compare.errors import ConfigError
from lens_compare.load_options import LoadOptions
from lens_compare.loading import DTYPES, ModelRef

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
        bnb_4bit_compute_dtype=DTYPES[compute_dtype],
        bnb_4bit_use_double_quant=False,
    )


def quantization_facts(options: LoadOptions) -> dict[str, Any]:
    """What the JSON provenance records about a quantized model."""
    return {
        "method": "bitsandbytes",
        "quant_type": options.quantization,
        "block_size": NF4_BLOCK_SIZE,
        "double_quant": False,
        "compute_dtype": options.dtype,
        "skipped": "lm_head, embeddings and norms stay in the compute dtype",
        "bitsandbytes": _version("bitsandbytes"),
    }


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def load_quantized(ref: ModelRef, kwargs: dict[str, Any], options: LoadOptions):
    """``from_pretrained`` with NF4 weights; ``kwargs`` are the loader's other arguments."""
    from transformers import AutoModelForCausalLM

    require_bitsandbytes()
    kwargs = {**kwargs, "quantization_config": nf4_config(options.dtype)}
    return AutoModelForCausalLM.from_pretrained(ref.location, **kwargs)
