"""The result of one comparison: per-token metrics, per-layer aggregates, provenance."""

from dataclasses import dataclass, field
from typing import Any

import einops
import numpy as np
import pandas as pd
from jaxtyping import Bool
from torch import Tensor

from lens_compare.aggregate import layer_records, token_mask
from lens_compare.capture import ResidualStates
from lens_compare.hooks import HOOK_KINDS
from lens_compare.metrics import METRIC_NAMES, STAT_NAMES
from lens_compare.per_token import TokenMetrics
from lens_compare.tokens import TokenizedPrompts

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ComparisonResult:
    """What ``lens_compare.compare`` returns.

    ``metrics[hook][metric]`` is a float32 tensor ``[layer, prompt, pos]`` (NaN at
    padding and where a depth metric is undefined); ``layers`` gives the layer of
    each row. ``residuals`` holds the captured states when they were kept.
    """

    provenance: dict[str, Any]
    layers: tuple[int, ...]
    tokens: TokenizedPrompts
    token_strings: tuple[tuple[str, ...], ...]
    untrained_base_tokens: dict[int, float]
    real_tokens: Bool[Tensor, "prompt pos"]
    metrics: TokenMetrics
    include_first_token: bool = False
    residuals: tuple[ResidualStates, ResidualStates] | None = field(default=None, repr=False)

    def layer_records(self, positions: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Per-layer aggregates; ``positions`` is ``all``, ``rest`` (no position 0) or ``first``."""
        if positions is None:
            positions = "all" if self.include_first_token else "rest"
        return layer_records(self.metrics, self.layers, token_mask(self.real_tokens, positions))

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the README for its schema)."""
        positions = "all" if self.include_first_token else "rest"
        mask = token_mask(self.real_tokens, positions)
        return {
            "schema_version": SCHEMA_VERSION,
            "provenance": self.provenance,
            "aggregation": {
                "over": "all prompts' real tokens (padding excluded)",
                "position_0": "included" if self.include_first_token else "excluded (see first_token)",
                "n_tokens": int(mask.sum()),
                "std": "population (ddof=0)",
            },
            "layers": list(self.layers),
            **self.layer_records(positions),
            "first_token": self.layer_records("first"),
        }

    def summary(self) -> pd.DataFrame:
        """One row per hook x layer x metric with mean/std/min/max, plus the first token's own rows."""
        rows = []
        main = "all" if self.include_first_token else "rest"
        for positions in (main, "first"):
            for hook, records in self.layer_records(positions).items():
                for record in records:
                    for name in METRIC_NAMES:
                        stats = record[name] or dict.fromkeys(STAT_NAMES)
                        rows.append({"positions": positions, "hook": hook, "layer": record["layer"],
                                     "metric": name, **stats})
        frame = pd.DataFrame(rows)
        for column in STAT_NAMES:
            frame[column] = frame[column].astype("float64")
        return frame

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy long table: one row per prompt x hook x layer x position x metric (real tokens only)."""
        real = self.real_tokens.numpy()
        prompt_idx, position_idx = np.nonzero(real)
        n_tokens = prompt_idx.size
        token_grid = np.full(real.shape, "", dtype=object)
        id_grid = np.full(real.shape, -1, dtype=np.int64)
        for row, (ids, strings) in enumerate(zip(self.tokens.token_ids, self.token_strings)):
            id_grid[row, : len(ids)] = ids
            token_grid[row, : len(strings)] = strings
        token_ids = id_grid[prompt_idx, position_idx]
        untrained = np.isin(token_ids, list(self.untrained_base_tokens))
        frames = []
        for hook in HOOK_KINDS:
            stacked = einops.rearrange(
                [self.metrics[hook][name] for name in METRIC_NAMES],
                "metric layer prompt pos -> metric layer prompt pos",
            ).numpy()
            picked = stacked[:, :, prompt_idx, position_idx]
            n_metrics, n_layers = picked.shape[:2]
            frames.append(pd.DataFrame({
                "prompt": np.tile(prompt_idx, n_metrics * n_layers),
                "hook": hook,
                "layer": np.tile(np.repeat(np.asarray(self.layers), n_tokens), n_metrics),
                "position": np.tile(position_idx, n_metrics * n_layers),
                "token": np.tile(token_grid[prompt_idx, position_idx], n_metrics * n_layers),
                "token_id": np.tile(token_ids, n_metrics * n_layers),
                "base_untrained": np.tile(untrained, n_metrics * n_layers),
                "metric": np.repeat(np.asarray(METRIC_NAMES, dtype=object), n_layers * n_tokens),
                "value": einops.rearrange(picked, "metric layer token -> (metric layer token)"),
            }))
        frame = pd.concat(frames, ignore_index=True)
        for column in ("hook", "metric", "token"):
            frame[column] = frame[column].astype("category")
        return frame
