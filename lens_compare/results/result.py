"""The result of one comparison: per-token metrics, per-layer aggregates, provenance."""

from dataclasses import dataclass, field
from typing import Any

import einops
import numpy as np
import pandas as pd
from jaxtyping import Bool
from torch import Tensor

from lens_compare.analyses import ANALYSES, TokenAnalysis
from lens_compare.analyses.difference_lens import POSITIONS as DIFFERENCE_POSITIONS
from lens_compare.analyses.difference_lens import READINGS
from lens_compare.errors import LensCompareError
from lens_compare.metrics.aggregate import (
    aggregated_positions,
    analysis_records,
    largest_tokens,
    layer_records,
    token_mask,
)
from lens_compare.metrics.bootstrap import Bootstrap, unit_for
from lens_compare.metrics.per_token import TokenMetrics
from lens_compare.metrics.residual import METRIC_NAMES
from lens_compare.metrics.states import ResidualStates
from lens_compare.models.token_classes import TOKEN_CLASSES, class_mask
from lens_compare.models.tokens import TokenizedPrompts
from lens_compare.results.plausibility import plausibility_warnings
from lens_compare.results.provenance import Provenance
from lens_compare.util.hooks import COMPONENTS, HOOK_KINDS

# The summary's statistic columns: the mean, its interval (NaN without one), the spread.
SUMMARY_STATS = ("mean", "ci_low", "ci_high", "std", "min", "max")
# 2: per-layer records carry ci_low/ci_high, aggregation.interval describes them.
# 3: the analyses' records (``components``, ``logit_lens``), also under ``first_token``;
#    ``token_classes`` (template vs content tokens), ``top_tokens``, ``warnings`` and ``cka``.
# 4: ``logit_lens`` records cover the layers ``provenance.logit_lens.layers`` names (the output
#    only by default), ``provenance.logit_lens`` says how they were chosen and ``provenance.plan``
#    gives the planner's figures; ``top_tokens`` ranks each prompt's own tokens apart from their
#    shared prefix (``shared_prefix``, ``shared_prefix_tokens``); token strings are readable
#    (``␣France``, not ``ĠFrance``), each beside its id.
# 5: ``difference_lens`` (the difference lens's records; null when it did not run) and
#    ``provenance.difference_lens``.
# 6: ``steering`` (the steering check's records, ``--steer``; null when it did not run).
# 7: ``difference_positions`` (the prompts' tokens whose difference aligns most with the difference
#    lens's mean shift; null when it did not run) and ``provenance.difference_lens.top_positions``.
SCHEMA_VERSION = 7
# The steering check's DataFrame (``ComparisonResult.steering``): its records' keys.
STEERING_COLUMNS = ("layer", "alpha", "prompts", "n_tokens", "kl_base", "kl_steered", "fraction_kl", "top1_base",
                    "top1_steered", "fraction_top1", "best_alpha")
# The difference lens's DataFrame (``ComparisonResult.difference_lens``).
DIFFERENCE_LENS_COLUMNS = ("layer", "positions", "reading", "direction", "rank", "token_id", "token", "logit")
# The difference lens's top positions (``ComparisonResult.difference_positions``): its records' keys.
DIFFERENCE_POSITIONS_COLUMNS = ("layer", "positions", "rank", "prompt", "position", "token_id", "token", "cosine",
                                "norm_ratio")
# The DataFrames' hook and metric categories: the residual hooks and metrics, then the analyses'.
HOOK_COLUMN = (*HOOK_KINDS, *COMPONENTS)
METRIC_COLUMN = tuple(dict.fromkeys(
    (*METRIC_NAMES, *(a.hook_and_metric(k)[1] for a in ANALYSES for k in a.keys))))


@dataclass(frozen=True)
class ComparisonResult:
    """What ``lens_compare.compare`` returns.

    ``metrics[hook][metric]`` is a float32 tensor ``[layer, prompt, pos]`` (NaN at
    padding and where a depth metric is undefined); ``layers`` gives the layer of
    each row. ``residuals`` holds the captured states when they were kept.

    A run read back with ``lens_compare.load_run`` whose token table was not saved has
    no per-token ``metrics`` (None): its per-layer aggregates come from the JSON
    (``stored_records``), and ``to_dataframe`` says how to get the table.
    """

    provenance: Provenance
    layers: tuple[int, ...]
    tokens: TokenizedPrompts
    token_strings: tuple[tuple[str, ...], ...]
    untrained_base_tokens: dict[int, float]
    real_tokens: Bool[Tensor, "prompt pos"]
    metrics: TokenMetrics | None
    include_first_token: bool = False
    residuals: tuple[ResidualStates, ResidualStates] | None = field(default=None, repr=False)
    # positions -> hook -> per-layer records, for a saved run without its token table.
    stored_records: dict[str, dict[str, list[dict[str, Any]]]] | None = field(default=None, repr=False)
    # The interval drawn around every per-layer mean (None: none).
    bootstrap: Bootstrap | None = None
    # The analyses' per-token values (``lens_compare.analyses``): key -> [layer, prompt, pos].
    analysis_metrics: dict[str, Tensor] = field(default_factory=dict, repr=False)
    # A saved run's top_tokens as its JSON holds them (the per-token table was not saved).
    stored_top_tokens: dict[str, Any] | None = field(default=None, repr=False)
    stored_warnings: list[str] | None = field(default=None, repr=False)
    # Linear CKA between the layers (``--cka``): {"hook", "layers", "n_tokens", "linear", "linear_debiased"}.
    cka: dict[str, Any] | None = field(default=None, repr=False)
    # The run's own noise floor (``--noise-floor``): the SFT model against itself in a second
    # precision, a result with the residual metrics only.
    noise_floor: "ComparisonResult | None" = field(default=None, repr=False)
    # The layers each analysis covers (the rows of its tensors), where not every captured layer.
    analysis_layers: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    # The difference lens's records (``lens_compare.analyses.difference_lens``), token strings
    # included; None when it did not run (or the run predates it).
    difference_lens_records: list[dict[str, Any]] | None = field(default=None, repr=False)
    # Its top positions (``lens_compare.analyses.difference_positions``), one record per listed token;
    # None when they were not ranked (the lens off, ``difference_lens_positions`` 0, or an older run).
    difference_positions_records: list[dict[str, Any]] | None = field(default=None, repr=False)
    # The steering check's records (``lens_compare.analyses.steering``); None when it did not run.
    steering_records: list[dict[str, Any]] | None = field(default=None, repr=False)
    # layer_records computed once per positions (repr, summary, plots and the verdict all read them).
    _records: dict[str, dict[str, list[dict[str, Any]]]] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        """A few lines: what was compared, how, and the headline drift (never the tensors)."""
        p = self.provenance
        records = self.layer_records()["resid_post"]
        last = records[-1]
        worst = max((r for r in records if r["relative_l2"]), key=lambda r: r["relative_l2"]["mean"], default=None)
        headline = "n/a" if worst is None else (
            f"last layer {last['layer']}: cosine {last['cosine']['mean']:.4f}, relative_l2 "
            f"{last['relative_l2']['mean']:.4f}; largest relative_l2 {worst['relative_l2']['mean']:.4f} "
            f"at layer {worst['layer']}")
        what = "noise floor: the SFT model against itself in a second precision, " \
            if p.is_noise_floor else ""
        return (
            f"ComparisonResult({what}pair={p.pair!r}, strategy={p.strategy!r}, device={p.device!r})\n"
            f"  base: {p.base_model['reference']} ({p.dtype['base']})\n"
            f"  sft:  {p.sft_model['reference']} ({p.dtype['sft']})\n"
            f"  {len(self.layers)} layers ({self.layers[0]}..{self.layers[-1]}), {len(self.tokens.token_ids)} prompts, "
            f"{sum(self.tokens.lengths)} tokens\n"
            f"  resid_post (mean over tokens): {headline}"
        )

    def token_classes(self) -> tuple[str, ...]:
        """The token classes aggregated apart: ``template`` and ``content`` with a chat template."""
        return TOKEN_CLASSES if self.tokens.content is not None else ()

    def positions_mask(self, positions: str) -> Bool[Tensor, "prompt pos"]:
        """The tokens an aggregate over ``positions`` covers (``all``, ``rest``, ``first`` or a token class)."""
        if positions in TOKEN_CLASSES:
            if self.tokens.content is None:
                raise LensCompareError(f"positions {positions!r}: token classes need a run with --chat-template sft")
            return class_mask(self.real_tokens, self.tokens.content, positions)
        return token_mask(self.real_tokens, positions)

    def layer_records(self, positions: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Per-layer aggregates; ``positions`` is ``all``, ``rest`` (no position 0), ``first``, or with a
        chat template ``template`` or ``content`` (see ``lens_compare.models.token_classes``)."""
        if positions is None:
            positions = aggregated_positions(self.include_first_token)
        if self.metrics is None:
            if positions not in self.stored_records:
                raise LensCompareError(
                    f"this saved run holds aggregates over {sorted(self.stored_records)} only; the token table "
                    "(--parquet or --csv) is needed for other positions"
                )
            return self.stored_records[positions]
        if positions not in self._records:
            records = layer_records(self.metrics, self.layers, self.positions_mask(positions), self.bootstrap)
            if self.noise_floor is not None:
                _add_clears_noise(records, self.noise_floor.layer_records(positions))
            self._records[positions] = records
        return self._records[positions]

    def analysis_layers_of(self, name: str) -> tuple[int, ...]:
        """The layers an analysis's per-token values cover (the rows of its tensors): the captured
        layers, unless it ran on fewer (the logit lens at the output only, or at chosen layers)."""
        return tuple(self.analysis_layers.get(name) or self.layers)

    def analyses(self) -> tuple[TokenAnalysis, ...]:
        """The analyses this result holds (per-token values, or records read back from a saved run)."""
        if self.metrics is None:
            held = {key for records in self.stored_records.values() for key in records}
            return tuple(a for a in ANALYSES if a.name in held)
        return tuple(a for a in ANALYSES if all(key in self.analysis_metrics for key in a.keys))

    def analysis_records(self, name: str, positions: str | None = None) -> list[dict[str, Any]]:
        """One analysis's per-layer records (``components``: ``{"layer", "attn_out": {...}, "mlp_out": {...}}``)."""
        held = [a.name for a in self.analyses()]
        if name not in held:
            raise LensCompareError(f"this result has no {name!r} analysis; it holds {held or 'none'}")
        if positions is None:
            positions = aggregated_positions(self.include_first_token)
        if self.metrics is None:
            return self.layer_records(positions)[name]
        key = f"{name}/{positions}"
        if key not in self._records:
            analysis = next(a for a in ANALYSES if a.name == name)
            values = {k: self.analysis_metrics[k] for k in analysis.keys}
            self._records[key] = analysis_records(values, self.analysis_layers_of(name), self.positions_mask(positions),
                                                  self.bootstrap)
        return self._records[key]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the README for its schema)."""
        positions = aggregated_positions(self.include_first_token)
        mask = token_mask(self.real_tokens, positions)
        return {
            "schema_version": SCHEMA_VERSION,
            "provenance": self.provenance.to_dict(),
            "aggregation": {
                "over": "all prompts' real tokens (padding excluded)",
                "position_0": "included" if self.include_first_token else "excluded (see first_token)",
                "n_tokens": int(mask.sum()),
                "std": "population (ddof=0)",
                "interval": self.bootstrap.describe(unit_for(len(self.tokens.token_ids)))
                if self.bootstrap is not None and self.bootstrap.resamples > 0 else None,
            },
            "layers": list(self.layers),
            **{kind: self.layer_records(positions)[kind] for kind in HOOK_KINDS},
            **{a.name: self.analysis_records(a.name, positions) for a in self.analyses()},
            "first_token": self._records_over("first"),
            "token_classes": {name: {"n_tokens": int(self.positions_mask(name).sum()), **self._records_over(name)}
                              for name in self.token_classes()} or None,
            "top_tokens": self.top_tokens(),
            "difference_lens": self.difference_lens_records,
            "difference_positions": self.difference_positions_records,
            "steering": self.steering_records,
            "warnings": self.warnings(),
            "cka": self.cka,
            "noise_floor": None if self.noise_floor is None else {
                "model": self.noise_floor.provenance.model, "dtype": self.noise_floor.provenance.dtype,
                **{kind: self.noise_floor.layer_records(positions)[kind] for kind in HOOK_KINDS},
                "first_token": {kind: self.noise_floor.layer_records("first")[kind] for kind in HOOK_KINDS}},
        }

    def warnings(self) -> list[str]:
        """What looks implausible against published base-vs-chat ranges (``lens_compare.results.plausibility``)."""
        if self.metrics is None and self.stored_warnings is not None:
            return self.stored_warnings
        models = (self.provenance.model_types or {})
        same = len(set(models.values())) == 1 if models else True
        return plausibility_warnings(self.layer_records()["resid_post"], self.provenance.n_layers, same)

    def _records_over(self, positions: str) -> dict[str, list[dict[str, Any]]]:
        """Every hook's and analysis's per-layer records over ``positions``."""
        return {**{kind: self.layer_records(positions)[kind] for kind in HOOK_KINDS},
                **{a.name: self.analysis_records(a.name, positions) for a in self.analyses()}}

    def top_tokens(self, k: int | None = None, *, hook: str = "resid_post",
                   metric: str = "relative_l2") -> dict[str, Any] | None:
        """Per layer, the ``k`` tokens (default: the run's ``top_tokens``, 10) where ``metric`` of
        ``hook`` is largest, over the aggregates' tokens. None when k is 0::

            {"hook", "metric", "k", "shared_prefix": P, "layers": [{"layer",
              "tokens": [{"prompt", "position", "token", "token_id", "value"}],
              "shared_prefix_tokens": [...]}]}

        Where every prompt starts with the same ``P`` tokens (a chat template's system prompt), a
        causal model computes the same states there in every prompt: ``tokens`` ranks each prompt's
        own tokens (positions >= P), and ``shared_prefix_tokens`` ranks that prefix once, in prompt 0
        (absent when P is 0). When nothing follows the prefix (identical prompts), ``tokens`` ranks
        the prefix of prompt 0."""
        if k is None:
            if self.metrics is None:
                return self.stored_top_tokens
            k = int((self.provenance.config or {}).get("top_tokens", 10))
        if k == 0:
            return None
        if self.metrics is None:
            raise LensCompareError("top_tokens of a saved run without its token table: only the run's own "
                                   "(result.top_tokens()); re-run with --parquet or --csv for others")
        values = self.metrics[hook][metric]
        own, prefix = self.split_at_shared_prefix()
        if not own.any():
            own, prefix = prefix, None

        def entries(found: list[tuple[int, int, float]]) -> list[dict[str, Any]]:
            return [{"prompt": prompt, "position": position, "token": self.token_strings[prompt][position],
                     "token_id": self.tokens.token_ids[prompt][position], "value": value}
                    for prompt, position, value in found]

        ranked = largest_tokens(values, own, k)
        in_prefix = largest_tokens(values, prefix, k) if prefix is not None and prefix.any() else None
        layers = []
        for row, layer in enumerate(self.layers):
            entry = {"layer": layer, "tokens": entries(ranked[row])}
            if in_prefix is not None:
                entry["shared_prefix_tokens"] = entries(in_prefix[row])
            layers.append(entry)
        return {"hook": hook, "metric": metric, "k": k, "shared_prefix": self.tokens.shared_prefix, "layers": layers}

    def difference_lens(self) -> pd.DataFrame:
        """The difference lens (``lens_compare.analyses.difference_lens``): one row per layer, token class
        (``positions``), ``reading`` (``base``, ``sft``, ``logit_difference``), ``direction``
        (``promoted``, ``suppressed``) and ``rank`` (1: the largest change), with the token's id, its
        readable string and its ``logit``. Refused, with the reason, for a run without one::

            frame = result.difference_lens()
            frame.query("reading == 'base' and positions == 'rest' and direction == 'promoted' and rank == 1")
        """
        if self.difference_lens_records is None:
            recorded = self.provenance.difference_lens
            why = (f"this run's difference lens is off: {recorded['reason']}" if recorded is not None
                   else "this run was saved before lens_compare had a difference lens (schema_version < 5)")
            raise LensCompareError(f"{why}; re-run it with the logit lens on (and without --no-difference-lens)")
        rows = [{"layer": record["layer"], "positions": record["positions"], "reading": record["reading"],
                 "direction": direction, "rank": rank, "token_id": item["token_id"], "token": item["token"],
                 "logit": item["logit"]}
                for record in self.difference_lens_records for direction in ("promoted", "suppressed")
                for rank, item in enumerate(record[direction], 1)]
        frame = pd.DataFrame(rows, columns=list(DIFFERENCE_LENS_COLUMNS))
        for column, categories in (("positions", DIFFERENCE_POSITIONS), ("reading", READINGS),
                                   ("direction", ("promoted", "suppressed"))):
            frame[column] = pd.Categorical(frame[column], categories=list(categories))
        return frame.astype({"layer": "int64", "rank": "int64", "token_id": "int64", "logit": "float64"})

    def difference_positions(self) -> pd.DataFrame:
        """Where the difference lens's mean shift δ lives: per layer and token class (``positions``),
        the prompts' own tokens whose SFT-minus-base difference d_t has the largest cosine with δ,
        ``rank`` 1 first, each with its ``prompt`` (index in the run), ``position``, ``token_id``,
        readable ``token``, ``cosine`` and ``norm_ratio`` (|d_t| / |δ|). Refused, with the reason, for
        a run without them::

            result.difference_positions().query("positions == 'rest' and rank <= 3")
        """
        if self.difference_positions_records is None:
            recorded = self.provenance.difference_lens
            if recorded is None or "top_positions" not in recorded:
                why = "this run was saved before the difference lens ranked positions (schema_version < 7)"
            elif not recorded["on"]:
                why = f"this run's difference lens is off: {recorded['reason']}"
            else:
                why = "this run ranked no positions (difference_lens_positions: 0)"
            raise LensCompareError(f"{why}; re-run it with the difference lens on and difference_lens_positions "
                                   "above 0 (--difference-lens-positions N)")
        frame = pd.DataFrame(self.difference_positions_records, columns=list(DIFFERENCE_POSITIONS_COLUMNS))
        frame["positions"] = pd.Categorical(frame["positions"], categories=list(DIFFERENCE_POSITIONS))
        return frame.astype({"layer": "int64", "rank": "int64", "prompt": "int64", "position": "int64",
                             "token_id": "int64", "cosine": "float64", "norm_ratio": "float64"})

    def steering(self) -> pd.DataFrame:
        """The steering check (``lens_compare.analyses.steering``): one row per steered layer and α,
        with the fraction of KL(p_sft ‖ p_base) and of the top-1 disagreement the steering removes and
        each layer's ``best_alpha``. Refused for a run without one::

            result.steering().pivot(index="layer", columns="alpha", values="fraction_kl")
        """
        if self.steering_records is None:
            raise LensCompareError("this run has no steering check (it was off: provenance.steering says why, or the "
                                   "run was saved before lens_compare had one: schema_version < 6); re-run it with "
                                   "--steer")
        frame = pd.DataFrame(self.steering_records, columns=list(STEERING_COLUMNS))
        # A fraction is null where undefined (the models agree exactly): NaN here, whatever the column holds.
        return frame.astype({"fraction_kl": "float64", "fraction_top1": "float64", "best_alpha": "float64"})

    def split_at_shared_prefix(self) -> tuple[Bool[Tensor, "prompt pos"], Bool[Tensor, "prompt pos"]]:
        """The aggregates' tokens split at the shared prefix: every prompt's own tokens, and the
        prefix's tokens of prompt 0 only (see ``top_tokens``)."""
        main = self.positions_mask(aggregated_positions(self.include_first_token))
        shared = self.tokens.shared_prefix
        own, prefix = main.clone(), main.clone()
        own[:, :shared] = False
        prefix[1:] = False
        prefix[0, shared:] = False
        return own, prefix

    def summary(self, *, hook: str | None = None, metric: str | None = None,
                positions: str | None = None) -> pd.DataFrame:
        """One row per hook x layer x metric with mean, ci_low, ci_high (its bootstrap interval), std, min,
        max, plus the first token's own rows. The analyses add their rows: ``components`` under hooks
        ``attn_out`` and ``mlp_out`` (metrics cosine, relative_l2, base_norm, sft_norm).

        ``hook``, ``metric`` and ``positions`` (``rest``/``all``, ``first``, and with a chat template
        ``template``, ``content``) keep only those rows. A curve needs one row per layer, so pick the
        positions too (or use ``result.plot``):

        >>> cosine = result.summary(hook="resid_post", metric="cosine", positions="rest")  # doctest: +SKIP
        >>> cosine.plot(x="layer", y="mean")  # doctest: +SKIP
        """
        main = aggregated_positions(self.include_first_token)
        groups = (main, "first", *self.token_classes())
        for name, value, allowed in (("hook", hook, HOOK_COLUMN), ("metric", metric, METRIC_COLUMN),
                                     ("positions", positions, groups)):
            if value is not None and value not in allowed:
                raise LensCompareError(f"summary({name}={value!r}): expected one of {list(allowed)}")
        rows = []
        for where in groups:
            if positions is not None and where != positions:
                continue
            for kind in HOOK_KINDS:
                for record in self.layer_records(where)[kind]:
                    for name in METRIC_NAMES:
                        rows.append({"positions": where, "hook": kind, "layer": record["layer"],
                                     "metric": name, **(record[name] or dict.fromkeys(SUMMARY_STATS))})
            for analysis in self.analyses():
                for record in self.analysis_records(analysis.name, where):
                    for key in analysis.keys:
                        kind, name = analysis.hook_and_metric(key)
                        outer, _, inner = key.partition(".")
                        stats = record[outer][inner] if inner else record[outer]
                        rows.append({"positions": where, "hook": kind, "layer": record["layer"],
                                     "metric": name, **(stats or dict.fromkeys(SUMMARY_STATS))})
        rows = [row for row in rows if (hook is None or row["hook"] == hook)
                and (metric is None or row["metric"] == metric)]
        if self.noise_floor is not None:  # relative_l2 over the run's own noise floor, per hook and layer
            ratios = {(where, kind, r["layer"]): r.get("clears_noise")
                      for where in groups for kind in HOOK_KINDS for r in self.layer_records(where)[kind]}
            for row in rows:
                if row["metric"] == "relative_l2":
                    row["clears_noise"] = ratios.get((row["positions"], row["hook"], row["layer"]))
        extra = ["clears_noise"] if self.noise_floor is not None else []
        frame = pd.DataFrame(rows, columns=["positions", "hook", "layer", "metric", *SUMMARY_STATS, *extra])
        for column in (*SUMMARY_STATS, *extra):
            frame[column] = frame[column].astype("float64")
        return _shared_dtypes(frame)

    def plot(self, metric: str = "relative_l2", **kwargs):
        """``metric`` by layer over the aggregates' tokens (``rest``, or ``all`` with the first token),
        ``resid_pre`` dashed and ``resid_post`` solid, with a band: ``lens_compare.plots.layer_curves``
        of this run (its keywords: ``hooks``, ``band``, ``noise_floor``, ``ax``). Needs the ``plots``
        extra; returns the Figure.

        >>> result.plot("cosine")                                      # doctest: +SKIP
        >>> result.plot("relative_l2", noise_floor=result.noise_floor)  # doctest: +SKIP
        """
        from lens_compare.plots import layer_curves

        return layer_curves([self], metric, **kwargs)

    def to_dataframe(self) -> pd.DataFrame:
        """Tidy long table: one row per prompt x hook x layer x position x metric (real tokens only),
        the analyses' per-token values included (hooks ``attn_out``/``mlp_out`` for ``components``)."""
        if self.metrics is None:
            if self.provenance.is_noise_floor:
                raise LensCompareError(
                    "a saved run keeps its noise floor's per-layer records only, not its per-token values: "
                    "summary() and the plots work; for per-token values, compare(..., noise_floor=True) in memory"
                )
            raise LensCompareError(
                "this saved run has no token table beside its JSON; re-run it with --parquet or --csv "
                "(the per-layer summary() is available)"
            )
        real = self.real_tokens.numpy()
        prompt_idx, position_idx = np.nonzero(real)
        n_tokens = prompt_idx.size
        token_grid = np.full(real.shape, "", dtype=object)
        id_grid = np.full(real.shape, -1, dtype=np.int64)
        for row, (ids, strings) in enumerate(zip(self.tokens.token_ids, self.token_strings, strict=True)):
            id_grid[row, : len(ids)] = ids
            token_grid[row, : len(strings)] = strings
        token_ids = id_grid[prompt_idx, position_idx]
        untrained = np.isin(token_ids, list(self.untrained_base_tokens))
        frames = []
        # (hook, metric, values [layer, prompt, pos], the layers of its rows): an analysis may cover
        # fewer layers than the residual metrics (a logit lens at the output only).
        columns = [(hook, name, self.metrics[hook][name], self.layers) for hook in HOOK_KINDS for name in METRIC_NAMES]
        for analysis in self.analyses():
            layers = self.analysis_layers_of(analysis.name)
            columns += [(*analysis.hook_and_metric(key), self.analysis_metrics[key], layers) for key in analysis.keys]
        for hook, layers in dict.fromkeys((column[0], column[3]) for column in columns):
            group = [(name, values) for kind, name, values, rows in columns if (kind, rows) == (hook, layers)]
            names = [name for name, _ in group]
            stacked = einops.rearrange(
                [values for _, values in group], "metric layer prompt pos -> metric layer prompt pos").numpy()
            picked = stacked[:, :, prompt_idx, position_idx]
            n_metrics, n_layers = picked.shape[:2]
            frames.append(pd.DataFrame({
                "prompt": np.tile(prompt_idx, n_metrics * n_layers),
                "hook": hook,
                "layer": np.tile(np.repeat(np.asarray(layers), n_tokens), n_metrics),
                "position": np.tile(position_idx, n_metrics * n_layers),
                "token": np.tile(token_grid[prompt_idx, position_idx], n_metrics * n_layers),
                "token_id": np.tile(token_ids, n_metrics * n_layers),
                "base_untrained": np.tile(untrained, n_metrics * n_layers),
                "metric": np.repeat(np.asarray(names, dtype=object), n_layers * n_tokens),
                "value": einops.rearrange(picked, "metric layer token -> (metric layer token)"),
            }))
        frame = pd.concat(frames, ignore_index=True)
        frame["token"] = frame["token"].astype("category")
        return _shared_dtypes(frame)


def _add_clears_noise(records: dict[str, list[dict[str, Any]]], floor: dict[str, list[dict[str, Any]]]) -> None:
    """Each record's ``clears_noise``: its mean relative_l2 over the floor's at the same hook and
    layer (None where either is undefined or the floor is exactly 0)."""
    for kind in HOOK_KINDS:
        for record, noise in zip(records[kind], floor[kind], strict=True):
            ours, theirs = (r["relative_l2"]["mean"] if r["relative_l2"] else None for r in (record, noise))
            record["clears_noise"] = ours / theirs if ours is not None and theirs else None


def _shared_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns ``summary()`` and ``to_dataframe()`` share get one dtype in both."""
    positions = ("rest", "all", "first", *TOKEN_CLASSES)
    for column, categories in (("hook", HOOK_COLUMN), ("metric", METRIC_COLUMN), ("positions", positions)):
        if column in frame:
            frame[column] = pd.Categorical(frame[column], categories=list(categories))
    frame["layer"] = frame["layer"].astype("int64")
    return frame
