"""Byte sizes and the one unit the planner computes in: GiB (2**30 bytes).

GPU capacities come from ``gpus.json`` as the MiB that nvidia-smi reports, so a
"48 GB" card is the 47.99 GiB the driver exposes, not 48e9 bytes.
"""

GIB = 2**30

def gib(n_bytes: int | float) -> float:
    """Bytes to GiB."""
    return n_bytes / GIB

# The logit lens's working memory (lens_compare.analyses.logit_lens): the budget planned with before
# the preflight sizes it from the memory its plan leaves free; the [token, vocab] tensors a chunk
# keeps for all its layers (both models' final log-probabilities and probabilities, float32; each
# model's logits of the layer at hand come on top, in the head's dtype); the float32 tensors of the
# slice of a chunk the divergences work on, and a slice's size in elements per tensor (small
# enough that a slice's tensors stay in a processor's cache).
LOGIT_LENS_CHUNK_BYTES = 256 * 2**20
LENS_FINAL_TENSORS = 4
LENS_SLICE_TENSORS = 12
LENS_SLICE_ELEMENTS = 2**20


def lens_working_bytes(tokens: int, vocab: int, logits_bytes: int, budget: int, keeps_finals: bool = True) -> int:
    """Bytes the logit lens's working tensors take for ``tokens`` tokens: a chunk of them (at most
    ``budget``) with its slice's tensors. At the output only (``keeps_finals`` False) a chunk keeps
    both models' logits alone; at other layers also both models' final distributions."""
    slice_tokens = max(1, LENS_SLICE_ELEMENTS // vocab)
    per_token = vocab * ((LENS_FINAL_TENSORS * 4 if keeps_finals else 0) + 2 * logits_bytes)
    return min(budget, tokens * per_token + LENS_SLICE_TENSORS * 4 * min(slice_tokens, tokens) * vocab)

# Elements of one slice of rows an FP8 tensor is dequantized in (lens_compare.models.fp8), so its float32
# temporaries stay small whatever the tensor's size; the planner counts three of them.
FP8_CHUNK_ELEMENTS = 2**22
