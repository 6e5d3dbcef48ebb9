"""Layer alignment: linear CKA between every base layer and every SFT layer.

Centred kernel alignment (Kornblith et al., 2019) compares two sets of representations of
the same n tokens up to rotation and isotropic scaling: ``linear[i][j]`` compares the base
model's layer i with the SFT model's layer j. A diagonal near 1 says fine-tuning kept each
layer's geometry; an off-diagonal maximum says computation moved to another depth.

With X (n x d) the centred features of one layer and K = X Xᵀ its Gram matrix:

- ``linear`` = <K, L>_F / sqrt(<K, K>_F <L, L>_F), the usual (biased) estimator: HSIC
  with the centring H K H, which the centred features already give.
- ``linear_debiased``: the same ratio of Song et al.'s (2012) unbiased HSIC estimator
  (used for CKA by Nguyen, Raghu and Kornblith, 2021), which removes the bias the plain
  estimator has at small token counts:
  HSIC_u(K, L) = [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((n-1)(n-2)) - 2/(n-2) · 1ᵀK̃L̃1] / (n(n-3)),
  K̃ = K with its diagonal set to 0. HSIC_u does not change when the features are centred,
  and with centred features (K1 = 0) every term reduces to <K, L>, the diagonals and the
  traces: tr(K̃L̃) = <K, L> - diag(K)·diag(L), 1ᵀK̃1 = -tr K, K̃1 = -diag(K).

All Gram matrices are float64. Memory: one model's Gram matrices of every layer (layers x
n² x 8 bytes) plus one layer's; ``gram_bytes`` says how much, so the plan can refuse a run
that cannot hold them before any model loads.
"""

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor


def gram_bytes(n_layers: int, n_tokens: int) -> int:
    """Host memory of CKA over ``n_tokens`` tokens and ``n_layers`` layers per model."""
    return (n_layers + 2) * n_tokens * n_tokens * 8


def centred_gram(features: Float[Tensor, "token d_model"]) -> Float[Tensor, "token token"]:
    """The Gram matrix of the column-centred features, in float64."""
    x = features.double()
    x = x - einops.reduce(x, "token d_model -> 1 d_model", "mean")
    return x @ x.T


def _flat(gram: Float[Tensor, "token token"]) -> Float[Tensor, " pair"]:
    return einops.rearrange(gram, "a b -> (a b)")


def cka_matrices(
    read_features: Callable[[str, int], Float[Tensor, "token d_model"]], states: tuple[int, ...],
) -> dict[str, Float[Tensor, "base sft"]]:
    """``linear`` and ``linear_debiased`` [base state, SFT state] over ``states``;
    ``read_features(role, state)`` gives one model's features of the selected tokens."""
    base_grams = torch.stack([centred_gram(read_features("base", state)) for state in states])
    n = base_grams.shape[-1]
    base_flat = einops.rearrange(base_grams, "layer a b -> layer (a b)")
    base_diag = torch.diagonal(base_grams, dim1=-2, dim2=-1)
    base_self = einops.reduce(base_flat * base_flat, "layer pair -> layer", "sum")
    base_trace = einops.reduce(base_diag, "layer token -> layer", "sum")
    base_diag_sq = einops.reduce(base_diag * base_diag, "layer token -> layer", "sum")
    linear = torch.full((len(states), len(states)), torch.nan, dtype=torch.float64)
    debiased = linear.clone()

    def unbiased(inner, diag_dot, trace_a, trace_b):
        if n < 4:
            return torch.full_like(inner, torch.nan)
        return (inner - diag_dot + trace_a * trace_b / ((n - 1) * (n - 2)) - 2 / (n - 2) * diag_dot) / (n * (n - 3))

    base_u = unbiased(base_self, base_diag_sq, base_trace, base_trace)
    for column, state in enumerate(states):
        gram = centred_gram(read_features("sft", state))
        flat, diag = _flat(gram), torch.diagonal(gram)
        inner = base_flat @ flat
        own = flat @ flat
        linear[:, column] = inner / torch.sqrt(base_self * own)
        trace = diag.sum()
        own_u = unbiased(own, diag @ diag, trace, trace)
        cross_u = unbiased(inner, base_diag @ diag, base_trace, trace)
        debiased[:, column] = cross_u / torch.sqrt(base_u * own_u)
    return {"linear": linear, "linear_debiased": debiased}


def selected_features(
    shard_states: Iterable[Tensor], masks: Sequence[Tensor]
) -> Float[Tensor, "token d_model"]:
    """One model's features of one state: the ``masks``ed tokens of every shard's state, in order
    (``masks[i]``, Bool ``[prompt pos]``, selects shard i's tokens from its ``[prompt pos d_model]``
    state, which may be narrower). Untyped in the signature: shards differ in prompts and width."""
    return torch.cat([state[mask[:, : state.shape[1]]] for state, mask in zip(shard_states, masks, strict=True)])


def layer_cka(
    shard_states: Callable[[str, int], Iterable[Tensor]],
    layers: tuple[int, ...],
    masks: Sequence[Tensor],
) -> dict[str, Any]:
    """CKA between the resid_post of every layer in ``layers`` of both models, over the ``masks``ed
    tokens (the aggregates' tokens, one mask per shard). ``shard_states(role, state)`` yields that
    state of every shard in order; it is read one layer at a time.

    >>> states = {("base", 1): [torch.randn(2, 3, 4)], ("sft", 1): [torch.randn(2, 3, 4)]}
    >>> layer_cka(lambda role, state: states[role, state], (0,), [torch.ones(2, 3, dtype=torch.bool)])["n_tokens"]
    6
    """
    found = cka_matrices(lambda role, state: selected_features(shard_states(role, state), masks),
                         tuple(layer + 1 for layer in layers))

    def rows(matrix) -> list[list[float | None]]:
        return [[value if math.isfinite(value) else None for value in row] for row in matrix.tolist()]

    return {"hook": "resid_post", "layers": list(layers), "n_tokens": sum(int(mask.sum()) for mask in masks),
            "linear": rows(found["linear"]), "linear_debiased": rows(found["linear_debiased"])}
