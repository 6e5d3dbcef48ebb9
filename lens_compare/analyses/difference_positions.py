"""Where the difference lens's mean shift lives: the prompts' own tokens whose difference points along it.

For each difference-lens layer and token class, with d_t = (sft - base) of ``resid_post`` at token t
and δ the class's mean of d_t (``lens_compare.analyses.difference_lens``), the ``n`` tokens of the
class, over every prompt of the run, with the largest cosine(d_t, δ); each with |d_t| / |δ|
(``norm_ratio``: how far that token moved against the mean shift).

δ is known only once every shard is in, so each shard keeps its tokens' differences for a second
look (``unit_differences``): d_t / |d_t| as float16 (a unit vector's entries lie in [-1, 1], where
float16 keeps 11 significant bits) and |d_t| in float32, token by token over the real tokens but
position 0 (every class's). The readings rank them a shard at a time (``Ranking``), the cosines in
float32 from the stored float16, whose rounding (at most 2^-11 of each entry) moves a cosine by at
most 2^-11 (Cauchy-Schwarz; float32's own sums add about 1e-6): the listed cosines' precision.

A token whose difference is exactly 0 (both models agree there) has no direction and is not ranked;
a class whose δ is 0 lists none. Ties rank by prompt, then position, so that however the prompts
were cut into shards the list is the same. The leading tokens every prompt shares (a chat template's
system prompt: ``TokenizedPrompts.shared_prefix``) have the same states in every prompt, so they are
ranked once, in prompt 0, as ``top_tokens`` ranks them (δ still counts every prompt's copy): else a
shared token would fill the list with one copy per prompt.

>>> spill = {l: unit_differences(base[l + 1], sft[l + 1], tokens, 0) for l in lens.layers}  # doctest: +SKIP
>>> rank_positions(lambda layer: [spill[layer]], sums, lens, token_ids)[None][0]  # doctest: +SKIP
{'layer': 0, 'positions': 'rest', 'rank': 1, 'prompt': 2, 'position': 7, 'token_id': 263, 'cosine': 0.93, ...}
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.analyses.difference_lens import DifferenceLens, sums_at

# Bytes a token's spill takes at one layer beside its float16 unit vector: |d_t| (float32) and its
# prompt and position (int64).
TOKEN_BYTES = 4 + 8 + 8


def unit_differences(base: Float[Tensor, "prompt pos d_model"], sft: Float[Tensor, "prompt pos d_model"],
                     tokens: Bool[Tensor, "prompt pos"], first_prompt: int) -> dict[str, Tensor]:
    """One state's spill over ``tokens`` of a shard whose first prompt is the run's ``first_prompt``:
    ``units`` [token, d_model] float16 (zeros where d_t = 0), ``norms`` [token] float32, ``prompt``
    (in the run) and ``position`` [token] int64, tokens in prompt-then-position order. The difference
    is taken in float32, as the difference lens's sums take it, and its norm on the CPU, whose row
    by row reduction gives a token the same norm whichever shard it is in (a GPU's reduction
    kernels are chosen by the tensor's shape)."""
    prompt, position = tokens.nonzero(as_tuple=True)
    # Over every position, padding too, then the tokens picked: faster than picking them first.
    shift = (sft.to(torch.float32) - base.to(torch.float32)).cpu()
    norms = torch.linalg.vector_norm(shift, dim=-1)
    units = shift.div_(torch.where(norms > 0, norms, 1.0)[..., None]).to(torch.float16)
    return {"units": units[tokens], "norms": norms[tokens], "prompt": prompt + first_prompt, "position": position}


def spill_bytes(n_tokens: int, n_layers: int, d_model: int) -> int:
    """What ``unit_differences`` keeps for ``n_tokens`` tokens at ``n_layers`` layers."""
    return n_tokens * n_layers * (2 * d_model + TOKEN_BYTES)


@dataclass
class Ranking:
    """The running top ``n`` of each group (a class, over all or a prefix of the positions) at one
    layer, against the groups' mean shifts ``deltas``. ``add`` a shard's spill at a time, in the
    run's prompt order; ``top`` the lists."""

    deltas: Float[Tensor, "group d_model"]
    n: int
    # |δ| per group, float64.
    delta_norms: Float[Tensor, " group"] = field(init=False)
    # δ / |δ| per group (zeros where δ is 0), float32.
    directions: Float[Tensor, "group d_model"] = field(init=False)
    # Per group, the best (cosine, prompt, position, |d_t|) so far, best first.
    best: list[list[tuple[float, int, int, float]]] = field(init=False)

    def __post_init__(self) -> None:
        self.deltas = self.deltas.to(torch.float64)
        self.delta_norms = torch.linalg.vector_norm(self.deltas, dim=-1)
        self.directions = (self.deltas / torch.where(self.delta_norms > 0, self.delta_norms, 1.0)[:, None]).float()
        self.best = [[] for _ in range(self.deltas.shape[0])]

    def add(self, spill: dict[str, Tensor], members: Bool[Tensor, "group token"]) -> None:
        """Rank a shard's tokens: ``members`` says which of them each group covers."""
        # Products (float16 times float32: computed in float32) summed row by row, not a matrix product:
        # a BLAS kernel's sum for one row depends on how many rows it is given, and a token's cosine
        # must not depend on its shard. Clamped: the float16 unit vectors' lengths are 1 only to their
        # rounding.
        cosines = torch.stack([einops.reduce(spill["units"] * direction, "token d_model -> token", "sum")
                               for direction in self.directions]).clamp_(-1.0, 1.0)
        ranked = members & (spill["norms"] > 0)[None] & (self.delta_norms > 0)[:, None]
        for group, best in enumerate(self.best):
            found = ranked[group].nonzero().flatten()
            if not found.numel():
                continue
            # A stable sort keeps equal cosines in prompt-then-position order, behind earlier shards'.
            picked = found[torch.sort(cosines[group, found], descending=True, stable=True).indices[: self.n]]
            found_here = list(zip(cosines[group, picked].tolist(), spill["prompt"][picked].tolist(),
                                  spill["position"][picked].tolist(), spill["norms"][picked].tolist(), strict=True))
            self.best[group] = sorted(best + found_here, key=lambda entry: -entry[0])[: self.n]

    def top(self) -> list[list[tuple[float, int, int, float]]]:
        """Per group, ``(cosine, prompt, position, norm_ratio)`` best first (empty where δ is 0)."""
        return [[(value, prompt, position, norm / delta) for value, prompt, position, norm in best]
                for best, delta in zip(self.best, self.delta_norms.tolist(), strict=True)]


def rank_positions(spills: Callable[[int], Iterable[dict[str, Tensor]]], sums: dict[str, Tensor],
                   lens: DifferenceLens, token_ids: Int[Tensor, "prompt pos"],
                   ) -> dict[int | None, list[dict[str, Any]] | None]:
    """The top positions of a run whose summed ``sums`` (``add_sums``) give δ, over whole prompts
    (key None) and over the first N positions of each of the lens's cuts (key N): ``spills(layer)``
    gives every shard's ``unit_differences`` at that layer, in prompt order, each read once for all
    the classes and cuts. Records ``{"layer", "positions", "rank", "prompt", "position", "token_id",
    "cosine", "norm_ratio"}`` by class, layer and rank; None for each where the lens ranks none."""
    cuts = (None, *lens.cuts)
    if not lens.ranks_positions:
        return dict.fromkeys(cuts)
    found: dict[int | None, list[dict[str, Any]]] = {cut: [] for cut in cuts}
    for row, layer in enumerate(lens.layers):
        # A group per cut and class with tokens: that class over the cut's positions, and its own δ.
        groups, deltas = [], []
        for cut in cuts:
            at = sums_at(sums, cut)
            for index in range(len(lens.positions)):
                if at["count"][index] > 0:
                    groups.append((cut, index))
                    deltas.append(at["difference"][row, index] / at["count"][index].double())
        ranking = Ranking(torch.stack(deltas), lens.top_positions)
        for spill in spills(layer):
            copies = (spill["prompt"] > 0) & (spill["position"] < lens.shared_prefix)
            classes = lens.masks[:, spill["prompt"], spill["position"]] & ~copies
            members = [classes[index] if cut is None else classes[index] & (spill["position"] < cut)
                       for cut, index in groups]
            ranking.add(spill, torch.stack(members))
        for (cut, index), best in zip(groups, ranking.top(), strict=True):
            found[cut] += [{"layer": layer, "positions": lens.positions[index], "rank": rank, "prompt": prompt,
                            "position": position, "token_id": int(token_ids[prompt, position]),
                            "cosine": cosine, "norm_ratio": ratio}
                           for rank, (cosine, prompt, position, ratio) in enumerate(best, 1)]
    order = {name: index for index, name in enumerate(lens.positions)}
    return {cut: sorted(records, key=lambda r: (order[r["positions"]], r["layer"], r["rank"]))
            for cut, records in found.items()}
