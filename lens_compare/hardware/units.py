"""Byte sizes and the one unit the planner computes in: GiB (2**30 bytes).

GPU capacities come from ``gpus.json`` as the MiB that nvidia-smi reports, so a
"48 GB" card is the 47.99 GiB the driver exposes, not 48e9 bytes.
"""

GIB = 2**30

# Bytes per element of the dtypes a model can be loaded in (weights and activations).
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}


def gib(n_bytes: int | float) -> float:
    """Bytes to GiB."""
    return n_bytes / GIB

# Float32 [tokens, vocab] working memory of one logit-lens chunk (lens_compare.analyses.logit_lens).
LOGIT_LENS_CHUNK_BYTES = 256 * 2**20

# Elements of one slice of rows an FP8 tensor is dequantized in (lens_compare.fp8), so its float32
# temporaries stay small whatever the tensor's size; the planner counts three of them.
FP8_CHUNK_ELEMENTS = 2**22
