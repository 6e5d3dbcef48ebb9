"""Analyses beyond the residual metrics, registered in one table (``ANALYSES``).

A per-token analysis adds float32 values ``[layer, prompt, pos]`` under its own keys to a
shard's metrics (next to the residual metrics, which are ``[state, prompt, pos]``). The
result aggregates each key per layer like the residual metrics (mean with its bootstrap
interval, std, min, max; same position-0 handling), writes the records under the
analysis's JSON key and adds rows to the DataFrames. Adding an analysis means one module
and one row here.

- ``components``: the base-vs-SFT comparison of each block's ``attn_out`` and ``mlp_out``
  (``lens_compare.analyses.components``). Record keys nest on the dot of their value keys:
  ``attn_out.cosine`` -> ``{"attn_out": {"cosine": {...}}}``.
- ``logit_lens``: each layer's ``resid_post`` through both models' final norm and
  unembedding, the two next-token distributions compared (``lens_compare.analyses.logit_lens``);
  flat keys, read off hook ``resid_post`` in the DataFrames.
"""

from dataclasses import dataclass

from lens_compare.analyses.components import COMPONENT_KEYS
from lens_compare.analyses.logit_lens import LOGIT_LENS_KEYS


@dataclass(frozen=True)
class TokenAnalysis:
    """One per-token analysis: its JSON key, its value keys and the hook each value reads."""

    name: str
    keys: tuple[str, ...]

    def hook_and_metric(self, key: str) -> tuple[str, str]:
        """The DataFrame's ``hook`` and ``metric`` columns for value ``key``."""
        hook, _, metric = key.partition(".")
        return (hook, metric) if metric else ("resid_post", key)


ANALYSES: tuple[TokenAnalysis, ...] = (
    TokenAnalysis("components", COMPONENT_KEYS),
    TokenAnalysis("logit_lens", LOGIT_LENS_KEYS),
)
ANALYSIS_KEYS: frozenset[str] = frozenset(key for analysis in ANALYSES for key in analysis.keys)
