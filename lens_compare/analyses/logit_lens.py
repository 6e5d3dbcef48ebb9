"""Logit lens between the models: what each layer's stream would predict, base vs SFT.

At every captured layer the residual stream after the block (``resid_post``) goes through
each model's own final norm and unembedding, giving two next-token distributions per
token, p_base and p_sft. Per token (natural log throughout):

- ``kl_sft_base`` = KL(p_sft || p_base) = sum p_sft (log p_sft - log p_base);
- ``js``: the Jensen-Shannon divergence 0.5 KL(p_sft || m) + 0.5 KL(p_base || m), m the mean;
- ``top1_agree``: 1 where both distributions' argmax is the same token, else 0;
- ``base_kl_to_final``, ``sft_kl_to_final``: KL(p_final || p_layer) of each model with
  its own final-layer distribution (0 at the last layer), the usual logit-lens
  convergence measure.

At the last layer the lens is the models' actual output, so ``kl_sft_base`` there is the
KL between the two models' real next-token distributions.

Which layers (``logit_lens``: ``auto``, ``all``, ``final``, a list, ``off``) is decided before any
weight is read, in ``lens_compare.analyses.lens_choice``.

Memory and speed: ``[tokens, vocab]`` tensors never pile up. The real tokens go in chunks
(``chunk_tokens``: as many as keep the chunk's tensors within a budget the preflight sizes from
the memory its plan leaves free); per chunk, both models' final distributions once, then for each
layer both head products into buffers reused from layer to layer (a fresh buffer of hundreds of
MiB is faulted in page by page), and the divergences over slices of a few tokens whose dozen
tensors stay in the processor's cache (``slice_tokens``). On the 2-core CPU this runs the whole
lens at 0.8-1.0 of the rate of one plain product of the same shape (before: 0.5). The unembedding
runs in the model's dtype (as the model's own head does), everything after it in float32.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.capture.head import Head
from lens_compare.util.units import (
    LENS_FINAL_TENSORS,
    LENS_SLICE_ELEMENTS,
    LENS_SLICE_TENSORS,
    LOGIT_LENS_CHUNK_BYTES,
)

LOGIT_LENS_KEYS = ("kl_sft_base", "js", "top1_agree", "base_kl_to_final", "sft_kl_to_final")
# The chunk's tensors and the slices' (lens_compare.util.units: the planner counts them too).
FINAL_TENSORS = LENS_FINAL_TENSORS
SLICE_TENSORS = LENS_SLICE_TENSORS
SLICE_ELEMENTS = LENS_SLICE_ELEMENTS
CHUNK_BYTES = LOGIT_LENS_CHUNK_BYTES


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES, logits_bytes: int = 4) -> int:
    """Tokens per chunk so that its ``[token, vocab]`` tensors stay within ``budget`` bytes: both
    models' final distributions (log-probabilities and probabilities, float32) and both models'
    logits of the layer at hand (``logits_bytes`` each, the head's dtype), beside the small
    slices the divergences work on (``slice_tokens``)."""
    per_token = vocab * (FINAL_TENSORS * 4 + 2 * logits_bytes)
    slices = SLICE_TENSORS * 4 * slice_tokens(vocab) * vocab
    if budget >= 2 * slices:
        return max(1, (budget - slices) // per_token)
    # A small vocabulary: a slice may be the whole chunk, so count its tensors per token too.
    return max(1, budget // (per_token + SLICE_TENSORS * 4 * vocab))


def slice_tokens(vocab: int) -> int:
    """Tokens of a chunk the divergences take at a time: ``SLICE_ELEMENTS`` floats per tensor, so the
    dozen tensors of a slice stay in the processor's cache (a whole chunk's would stream from
    memory, and be faulted in fresh for every operation: four times slower on the CPU)."""
    return max(1, SLICE_ELEMENTS // vocab)


def _dot(a: Float[Tensor, "token vocab"], b: Float[Tensor, "token vocab"]) -> Float[Tensor, " token"]:
    """Per-token sum over the vocabulary of a * b: a fused product on a slice that stays in cache, a
    batched matrix product (no ``[token, vocab]`` temporary) on a whole chunk."""
    if a.numel() > 4 * SLICE_ELEMENTS:
        return einops.einsum(a, b, "token vocab, token vocab -> token")
    return torch.linalg.vecdot(a, b)


@dataclass(frozen=True)
class Distributions:
    """One model's next-token distributions over some tokens: log-probabilities, probabilities, each
    token's most likely id, and sum p log p (minus the entropy; needed for the final layer only)."""

    logp: Float[Tensor, "token vocab"]
    p: Float[Tensor, "token vocab"]
    top: Int[Tensor, " token"]
    neg_entropy: Float[Tensor, " token"] | None = None

    @staticmethod
    def of(logits: Float[Tensor, "token vocab"], with_entropy: bool = False) -> "Distributions":
        """From logits (upcast to float32 first: the softmax and everything after it is float32)."""
        logits = logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        p = torch.softmax(logits, dim=-1)
        return Distributions(logp, p, logits.argmax(dim=-1), _dot(p, logp) if with_entropy else None)

    def rows(self, start: int, stop: int) -> "Distributions":
        return Distributions(self.logp[start:stop], self.p[start:stop], self.top[start:stop],
                             None if self.neg_entropy is None else self.neg_entropy[start:stop])


def token_divergences(
    base: Distributions, sft: Distributions, base_final: Distributions, sft_final: Distributions,
) -> dict[str, Float[Tensor, " token"]]:
    """Every logit-lens value of some tokens, in few passes over the ``[token, vocab]`` tensors (the
    finals need their ``neg_entropy``):

    - ``kl_sft_base`` = sum p_s d, with d = log p_s - log p_b, term by term: two close distributions
      give a small, accurate value;
    - ``js``: with g = log p_s - log m = log 2 - softplus(-d) (m the mean of the two), KL(p_s || m) =
      sum p_s g and KL(p_b || m) = sum p_b (g - d), so JS = (sum p_s g + sum p_b g - sum p_b d) / 2,
      each a sum of terms that vanish with d;
    - ``top1_agree``: both argmaxes equal;
    - ``*_kl_to_final`` = sum p_f log p_f - sum p_f log p_layer: the final layer's part once per chunk
      (its ``neg_entropy``), one product per layer; exactly 0 at the final layer itself.
    """
    d = sft.logp - base.logp
    g = torch.nn.functional.softplus(d, beta=-1.0).add_(math.log(2.0))

    def to_final(final: Distributions, layer: Distributions) -> Tensor:
        if layer is final:
            return torch.zeros_like(layer.top, dtype=layer.p.dtype)
        return final.neg_entropy - _dot(final.p, layer.logp)

    values = {
        "kl_sft_base": _dot(sft.p, d),
        "js": 0.5 * (_dot(sft.p, g) + _dot(base.p, g) - _dot(base.p, d)),
        "top1_agree": (base.top == sft.top).float(),
        "base_kl_to_final": to_final(base_final, base),
        "sft_kl_to_final": to_final(sft_final, sft),
    }
    # Rounding can leave a divergence of identical distributions at -1e-8: a divergence is >= 0.
    return {key: value if key == "top1_agree" else value.clamp_min(0) for key, value in values.items()}


def logit_lens_metrics(
    heads: dict[str, Head],
    read_state: Callable[[str, int], Float[Tensor, "prompt pos d_model"]],
    layers: tuple[int, ...],
    final_state: int,
    real: Bool[Tensor, "prompt pos"],
    *,
    budget: int = CHUNK_BYTES,
    states_in_memory: bool = True,
    on_layer: Callable[[], None] | None = None,
) -> dict[str, Float[Tensor, "layer prompt pos"]]:
    """``LOGIT_LENS_KEYS`` -> [layer, prompt, pos] (NaN at padding) for the ``resid_post`` of
    ``layers`` (state l + 1); ``read_state(role, state)`` gives a model's state.

    The real tokens go in chunks (``chunk_tokens`` of ``budget``): per chunk, both models' final
    distributions once, then each layer's head product into buffers reused from layer to layer, and
    the divergences slice by slice (``slice_tokens``). ``states_in_memory``: chunks outside, layers
    inside (``read_state`` is called per chunk, so it must be cheap). Otherwise (states on disk, the
    streamed run) layers outside: each state is read once, and with more than one chunk the final
    distributions are recomputed for every layer. Both give the same numbers. ``on_layer()`` is
    called as each layer's values are complete (progress)."""
    rows, columns = real.nonzero(as_tuple=True)
    n_tokens = int(rows.numel())
    vocabs = {head.vocab for head in heads.values()}
    if len(vocabs) != 1:
        raise ValueError(f"the heads' vocabularies differ ({sorted(vocabs)}): give heads over the shared ids")
    vocab = vocabs.pop()
    logits_bytes = max(head.weight.element_size() for head in heads.values())
    # Chunks of equal size (a last chunk of a few tokens would make a slow, thin head product).
    count = -(-n_tokens // chunk_tokens(vocab, budget, logits_bytes)) if n_tokens else 1
    step = max(1, -(-n_tokens // count))
    sliced = slice_tokens(vocab)
    chunks = [(start, min(start + step, n_tokens)) for start in range(0, n_tokens, step)]
    out = {key: torch.full((len(layers), n_tokens), torch.nan) for key in LOGIT_LENS_KEYS}
    buffers = {role: torch.empty((step, vocab), dtype=head.weight.dtype, device=head.device)
               for role, head in heads.items()}
    # At the output only (the default), nothing of a chunk is kept: its slices are compared as they come.
    only_final = all(layer + 1 == final_state for layer in layers)
    # Else each model's final log-probabilities and probabilities of a chunk, float32, written in place.
    final_logp = {} if only_final else {role: torch.empty((step, vocab), device=head.device)
                                        for role, head in heads.items()}
    final_p = {} if only_final else {role: torch.empty((step, vocab), device=head.device)
                                     for role, head in heads.items()}

    with torch.inference_mode():
        finals = {role: read_state(role, final_state)[rows, columns] for role in heads}

        if only_final:
            for start, stop in chunks:
                logits = {role: head.logits(finals[role][start:stop], out=buffers[role][: stop - start])
                          for role, head in heads.items()}
                for a in range(0, stop - start, sliced):
                    ends = {role: Distributions.of(logits[role][a:a + sliced]) for role in heads}
                    values = token_divergences(ends["base"], ends["sft"], ends["base"], ends["sft"])
                    for key, value in values.items():
                        out[key][:, start + a:start + a + len(value)] = value.cpu()
            if on_layer is not None:
                on_layer()
            return _grids(out, real, rows, columns, len(layers))

        def final_distributions(start: int, stop: int) -> dict[str, Distributions]:
            """Both models' final distributions of a chunk (float32), into the buffers kept for it."""
            found = {}
            n = stop - start
            for role, head in heads.items():
                logits = head.logits(finals[role][start:stop], out=buffers[role][:n])
                logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=final_logp[role][:n])
                p = torch.softmax(logits, dim=-1, dtype=torch.float32, out=final_p[role][:n])
                # Its entropy serves the other layers' KL to the final one.
                found[role] = Distributions(logp, p, logits.argmax(dim=-1), _dot(p, logp))
            return found

        def compare(row: int, start: int, stop: int, final: dict[str, Distributions],
                    resid: dict[str, Tensor]) -> None:
            is_final = layers[row] + 1 == final_state
            logits = None if is_final else {role: heads[role].logits(resid[role], out=buffers[role][: stop - start])
                                            for role in heads}
            for a in range(0, stop - start, sliced):
                b = min(a + sliced, stop - start)
                ends = {role: final[role].rows(a, b) for role in heads}
                layer = ends if is_final else {role: Distributions.of(logits[role][a:b]) for role in heads}
                values = token_divergences(layer["base"], layer["sft"], ends["base"], ends["sft"])
                for key, value in values.items():
                    out[key][row, start + a:start + b] = value.cpu()

        if states_in_memory or len(chunks) == 1:
            for index, (start, stop) in enumerate(chunks):
                final = final_distributions(start, stop)
                for row, layer in enumerate(layers):
                    # With one chunk of every token (states on disk): each state is read once.
                    resid = {role: read_state(role, layer + 1)[rows[start:stop], columns[start:stop]]
                             for role in heads}
                    compare(row, start, stop, final, resid)
                    if on_layer is not None and index == len(chunks) - 1:
                        on_layer()
        else:
            for row, layer in enumerate(layers):
                state = {role: read_state(role, layer + 1)[rows, columns] for role in heads}
                for start, stop in chunks:
                    compare(row, start, stop, final_distributions(start, stop),
                            {role: state[role][start:stop] for role in heads})
                if on_layer is not None:
                    on_layer()
    return _grids(out, real, rows, columns, len(layers))


def _grids(out: dict[str, Tensor], real: Tensor, rows: Tensor, columns: Tensor, n_layers: int) -> dict[str, Tensor]:
    """Each key's [layer, token] values back on the [layer, prompt, pos] grid (NaN at padding)."""
    grids = {}
    for key, flat in out.items():
        grid = torch.full((n_layers, *real.shape), torch.nan)
        grid[:, rows, columns] = flat
        grids[key] = grid
    return grids
