"""95% percentile bootstrap intervals for the per-layer means.

A per-layer ``mean`` pools every selected token of every prompt. Tokens of one prompt
are not independent (they share a context), so the interval resamples whole prompts
with replacement (a cluster bootstrap) and recomputes the pooled mean of each
resample: ``sum of the drawn prompts' token values / number of their tokens``. With a
single prompt there is nothing to resample but its tokens, which is what it does then
(``unit == "token"``), and the result says so: such an interval only describes that
prompt.

>>> settings = Bootstrap(resamples=1000, seed=0)
>>> low, high = interval(values, mask, settings)   # doctest: +SKIP

Everything is float64; the resamples come from a ``torch.Generator`` seeded with
``seed``, so the same run gives the same interval.
"""

import functools
from dataclasses import dataclass
from typing import Literal

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

Unit = Literal["prompt", "token"]


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: ``resamples`` draws (0: no interval), ``level`` coverage."""

    resamples: int = 1000
    seed: int = 0
    level: float = 0.95

    def describe(self, unit: Unit) -> dict[str, object]:
        over = "prompts (each prompt's tokens kept together)" if unit == "prompt" else \
            "tokens within the one prompt (a single prompt: the interval describes that prompt only)"
        return {"method": "percentile bootstrap of the pooled mean", "resampled": over,
                "resamples": self.resamples, "level": self.level, "seed": self.seed}


def unit_for(n_prompts: int) -> Unit:
    return "prompt" if n_prompts > 1 else "token"


@functools.lru_cache(maxsize=4)
def resample_counts(n_units: int, settings: Bootstrap) -> Float[Tensor, "resample unit"]:
    """How often each unit is drawn in each resample (rows sum to ``n_units``). Cached: every
    metric, hook and layer of a run uses the same draws (do not modify the result)."""
    generator = torch.Generator().manual_seed(settings.seed)
    drawn = torch.randint(n_units, (settings.resamples, n_units), generator=generator)
    counts = torch.zeros((settings.resamples, n_units), dtype=torch.float64)
    return counts.scatter_add_(1, drawn, torch.ones_like(drawn, dtype=torch.float64))


def resampled_means(
    sums: Float[Tensor, "row unit"], counts: Float[Tensor, "row unit"], draws: Float[Tensor, "resample unit"]
) -> Float[Tensor, "row resample"]:
    """The pooled mean of every resample: drawn units' sums over drawn units' token counts
    (NaN where a resample drew no token)."""
    total = einops.einsum(sums, draws, "row unit, resample unit -> row resample")
    if bool((counts == counts[:1]).all()):
        # Every row counts the same tokens (no value undefined anywhere): one row's draws serve all.
        tokens = einops.einsum(counts[:1], draws, "row unit, resample unit -> row resample")
    else:
        tokens = einops.einsum(counts, draws, "row unit, resample unit -> row resample")
    return torch.where(tokens > 0, total / tokens, torch.nan)


def interval(
    values: Float[Tensor, "row prompt pos"], mask: Bool[Tensor, "row prompt pos"], settings: Bootstrap
) -> tuple[Float[Tensor, " row"], Float[Tensor, " row"]]:
    """(low, high) of the ``settings.level`` percentile interval of each row's pooled mean
    over the ``mask``ed tokens; NaN for a row with no token."""
    v = torch.where(mask, values.double(), 0.0)
    weight = mask.double()
    if values.shape[1] > 1:
        sums = einops.reduce(v, "row prompt pos -> row prompt", "sum")
        counts = einops.reduce(weight, "row prompt pos -> row prompt", "sum")
        # Prompts with no selected token at all (every row) are not units: they would only
        # shrink the effective sample.
        used = einops.reduce(counts, "row prompt -> prompt", "max") > 0
    else:
        sums = einops.rearrange(v, "row 1 pos -> row pos")
        counts = einops.rearrange(weight, "row 1 pos -> row pos")
        used = einops.reduce(counts, "row pos -> pos", "max") > 0
    sums, counts = sums[:, used], counts[:, used]
    rows = values.shape[0]
    if sums.shape[1] == 0:
        nan = torch.full((rows,), torch.nan, dtype=torch.float64)
        return nan, nan.clone()
    means = resampled_means(sums, counts, resample_counts(sums.shape[1], settings))
    tail = (1.0 - settings.level) / 2
    bounds = torch.nanquantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64), dim=1)
    return bounds[0], bounds[1]
