"""Figures of a comparison (optional extra ``plots``: matplotlib).

Every function returns a ``matplotlib.figure.Figure``, draws into ``ax`` when one is given
(so figures compose), and never calls ``plt.show()``. The figures it creates are not
registered with pyplot: a notebook shows each once (as the cell's value), and nothing
accumulates in pyplot's figure list; save one with ``figure.savefig(...)``.

>>> from lens_compare import plots
>>> plots.layer_curves([result], "relative_l2", noise_floor=floor_result)   # doctest: +SKIP
>>> plots.position_heatmap(result, "cosine", prompt=0)                      # doctest: +SKIP
>>> plots.norm_profile(result)                                              # doctest: +SKIP
>>> plots.sublayer_curves(result, "relative_l2")                            # doctest: +SKIP
>>> plots.logit_lens_curves(result)                                         # doctest: +SKIP
>>> plots.cka_matrix(result)                                                # doctest: +SKIP
>>> plots.difference_lens_table(result, reading="base", positions="rest")    # doctest: +SKIP

Per-layer values are the means over tokens (position 0 excluded unless the run included
it), with a band of one standard deviation, the min-max range, or (``band="ci"``) the 95%
bootstrap interval of the mean. ``1 - cosine`` and
``relative_l2`` are drawn on a log scale, where small values matter.
"""

from pathlib import Path
from typing import Any

import numpy as np

from lens_compare.analyses.components import COMPONENT_METRICS
from lens_compare.errors import LensCompareError
from lens_compare.metrics.aggregate import aggregated_positions
from lens_compare.metrics.residual import METRIC_NAMES
from lens_compare.util.hooks import COMPONENTS, HOOK_KINDS
from lens_compare.util.progress import in_notebook

# Metrics drawn as 1 - value on a log axis, and metrics drawn on a log axis as they are.
ONE_MINUS = ("cosine", "base_cosine_prev", "sft_cosine_prev")
LOG_SCALE = ("relative_l2",)
# Depth diagnostics come in a base and an SFT flavour, drawn side by side.
DEPTH = {"cosine_prev": ("base_cosine_prev", "sft_cosine_prev"), "norm_delta": ("base_norm_delta", "sft_norm_delta")}
HOOK_STYLE = {"resid_pre": "--", "resid_post": "-"}
# Floor for log axes: a value that is exactly 0 (identical models) is drawn here.
LOG_FLOOR = 1e-9


def require_matplotlib() -> None:
    """Fail before any model loads when the plots extra is missing."""
    _matplotlib()


def _matplotlib():
    try:
        import matplotlib
        import matplotlib.figure
    except ImportError:
        raise LensCompareError("plots need matplotlib: pip install 'lens_compare[plots]'") from None
    if in_notebook():
        _show_figures_inline()
    return matplotlib


def _show_figures_inline() -> None:
    """Let Jupyter show a returned Figure as a PNG. The inline backend registers this only
    once pyplot has drawn something, and our figures never go through pyplot; a formatter
    already registered (by the backend, or the user) is left alone."""
    from IPython import get_ipython
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    formatter = get_ipython().display_formatter.formatters["image/png"]
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        formatter.for_type(Figure, lambda figure: print_figure(figure, "png", bbox_inches="tight"))


def _subplots(figsize: tuple[float, float], ncols: int = 1, **kwargs):
    """A new Figure outside pyplot and its axes."""
    figure = _matplotlib().figure.Figure(figsize=figsize, layout="constrained")
    return figure, figure.subplots(1, ncols, **kwargs)


def _label(result) -> str:
    return str(result.provenance.pair or "run")


def _series(result, hook: str, metric: str, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """layers, mean, band low, band high of one hook's metric (NaN where undefined); a sublayer
    output (``attn_out``, ``mlp_out``) reads the components analysis."""
    if hook in COMPONENTS:
        records = result.analysis_records("components")
        stats = [r[hook][metric] or {} for r in records]
    else:
        records = result.layer_records()[hook]
        stats = [r[metric] or {} for r in records]
    layers = np.array([r["layer"] for r in records])
    mean = np.array([s.get("mean", np.nan) if s.get("mean") is not None else np.nan for s in stats], dtype=float)
    if band == "std":
        std = np.array([s.get("std") if s.get("std") is not None else np.nan for s in stats], dtype=float)
        low, high = mean - std, mean + std
    elif band in ("minmax", "ci"):
        lower, upper = ("min", "max") if band == "minmax" else ("ci_low", "ci_high")
        if band == "ci" and not any(lower in s for s in stats):
            raise LensCompareError("band 'ci': this run has no bootstrap intervals (it ran with bootstrap=0, or "
                                   "before they existed)")
        low = np.array([s.get(lower) if s.get(lower) is not None else np.nan for s in stats], dtype=float)
        high = np.array([s.get(upper) if s.get(upper) is not None else np.nan for s in stats], dtype=float)
    else:
        raise LensCompareError(f"band {band!r}: expected 'std', 'minmax' or 'ci'")
    return layers, mean, low, high


def _transform(metric: str, values: np.ndarray) -> np.ndarray:
    """What is drawn: ``1 - value`` for cosines; on log axes, values <= 0 (identical models give
    exactly 0) are left out, and the axis says so."""
    if metric in ONE_MINUS:
        values = 1.0 - values
    if metric in ONE_MINUS or metric in LOG_SCALE:
        return np.where(values > 0, values, np.nan)
    return values


def _axis_label(metric: str) -> str:
    return f"1 - {metric} (log)" if metric in ONE_MINUS else f"{metric} (log)" if metric in LOG_SCALE else metric


def layer_curves(
    runs: list[Any],
    metric: str,
    *,
    hooks: tuple[str, ...] = HOOK_KINDS,
    band: str = "std",
    noise_floor: Any = None,
    ax=None,
):
    """Per-layer mean of ``metric`` for each run, with its band; ``resid_pre`` dashed,
    ``resid_post`` solid. ``noise_floor``: a run (``smollm2-dtype``, ``smollm2-nf4``, or a
    model against itself in another precision) drawn as a grey band from 0 to its mean +
    one std, so a difference inside it does not clear numerical noise.

    A depth diagnostic (``cosine_prev``, ``norm_delta``) is drawn for the base and the
    SFT model side by side: two axes, unless ``ax`` is given (then both in it)."""
    if metric in DEPTH:
        if ax is not None:
            for name in DEPTH[metric]:
                layer_curves(runs, name, hooks=hooks, band=band, ax=ax)
            return ax.figure
        figure, axes = _subplots((11.0, 3.8), 2, sharey=True)
        for axis, name in zip(axes, DEPTH[metric], strict=True):
            layer_curves(runs, name, hooks=hooks, band=band, ax=axis)
            axis.set_title(f"{name.split('_')[0]} model")
        return figure
    if metric not in METRIC_NAMES:
        raise LensCompareError(f"metric {metric!r}: expected one of {list(METRIC_NAMES)} or {list(DEPTH)}")
    figure, ax = (_subplots((7.5, 4.0)) if ax is None else (ax.figure, ax))
    colours = _matplotlib().rcParams["axes.prop_cycle"].by_key()["color"]
    if noise_floor is not None:
        layers, mean, low, high = _series(noise_floor, hooks[-1], metric, "std")
        # The floor's largest departure: mean + std (for a cosine, 1 - (mean - std)).
        top = _transform(metric, low if metric in ONE_MINUS else high)
        floor_tops = top
        bottom = LOG_FLOOR if metric in ONE_MINUS + LOG_SCALE else np.minimum(0.0, np.nanmin(low))
        ax.fill_between(layers, bottom, top, color="0.55", alpha=0.3, lw=0,
                        label=f"noise floor: {_label(noise_floor)}, {hooks[-1]} (mean + 1 std)")
    logarithmic = metric in ONE_MINUS or metric in LOG_SCALE
    drawn, zeros = ([floor_tops] if noise_floor is not None else []), False
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        for hook in hooks:
            layers, mean, low, high = _series(run, hook, metric, band)
            if metric in ONE_MINUS:
                low, high = high, low  # 1 - x flips the band
            shown = _transform(metric, mean)
            zeros |= bool(np.any(np.isfinite(mean) & ~np.isfinite(shown)))
            drawn.append(shown)
            ax.plot(layers, shown, HOOK_STYLE[hook], color=colour, lw=1.8, marker=".", ms=4,
                    label=f"{_label(run)}, {hook}")
            lower = _transform(metric, low)
            if logarithmic:  # a band reaching 0 or below runs off the bottom of the log axis
                lower = np.where(np.isfinite(lower), lower, LOG_FLOOR)
            ax.fill_between(layers, lower, _transform(metric, high), color=colour,
                            alpha=0.15 if hook == "resid_post" else 0.08, lw=0)
    if logarithmic:
        ax.set_yscale("log")
        positive = np.concatenate([d[np.isfinite(d)] for d in drawn] or [np.array([])])
        # Identical models draw nothing at all here: still a valid (empty) log axis.
        ax.set_ylim(*((positive.min() / 5, None) if positive.size else (LOG_FLOOR, 1.0)))
        if zeros and not positive.size:
            ax.text(0.5, 0.5, f"{_axis_label(metric).removesuffix(' (log)')} is 0 at every layer:\nthe two models' "
                    "residuals are identical", transform=ax.transAxes, ha="center", va="center", fontsize=10,
                    color="0.3")
        elif zeros:
            ax.text(0.01, 0.02, "0 (identical in both models) is not drawn on a log axis", transform=ax.transAxes,
                    fontsize=7, color="0.35")
    all_layers = [layer for run in runs for layer in run.layers]
    ax.set_xlim(min(all_layers) - 0.5, max(all_layers) + 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel(_axis_label(metric))
    spread = {"std": "± 1 std", "minmax": "min-max", "ci": "95% bootstrap CI of the mean"}[band]
    ax.set_title(f"{metric} by layer (mean over tokens, band {spread})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return figure


def sublayer_curves(result, metric: str = "relative_l2", *, band: str = "std", ax=None):
    """Per-layer mean of ``metric`` for each block's attention write (``attn_out``) and MLP write
    (``mlp_out``), base vs SFT, with the residual stream after the block (``resid_post``, grey)
    for reference: where the stream drifts, which sublayer wrote the change."""
    if metric not in COMPONENT_METRICS:
        raise LensCompareError(f"metric {metric!r}: the sublayer comparison has {list(COMPONENT_METRICS)}")
    if "components" not in [a.name for a in result.analyses()]:
        raise LensCompareError("this run has no sublayer comparison: it ran with --no-components (components=False)")
    figure, ax = (_subplots((7.5, 4.0)) if ax is None else (ax.figure, ax))
    colours = _matplotlib().rcParams["axes.prop_cycle"].by_key()["color"]
    logarithmic = metric in ONE_MINUS or metric in LOG_SCALE
    drawn, zeros = [], False
    lines = [("attn_out", colours[0], "-"), ("mlp_out", colours[1], "-")]
    if metric in ("cosine", "relative_l2"):  # the drift of the stream itself; a norm is on another scale
        lines.append(("resid_post", "0.5", ":"))
    for hook, colour, style in lines:
        layers, mean, low, high = _series(result, hook, metric, band)
        if metric in ONE_MINUS:
            low, high = high, low
        shown = _transform(metric, mean)
        zeros |= bool(np.any(np.isfinite(mean) & ~np.isfinite(shown)))
        drawn.append(shown)
        ax.plot(layers, shown, style, color=colour, lw=1.8, marker=".", ms=4,
                label=hook + (" (the stream, for reference)" if hook == "resid_post" else ""))
        lower = _transform(metric, low)
        if logarithmic:
            lower = np.where(np.isfinite(lower), lower, LOG_FLOOR)
        ax.fill_between(layers, lower, _transform(metric, high), color=colour, alpha=0.12, lw=0)
    if logarithmic:
        ax.set_yscale("log")
        positive = np.concatenate([d[np.isfinite(d)] for d in drawn])
        ax.set_ylim(*((positive.min() / 5, None) if positive.size else (LOG_FLOOR, 1.0)))
        if zeros:
            ax.text(0.01, 0.02, "0 (identical in both models) is not drawn on a log axis", transform=ax.transAxes,
                    fontsize=7, color="0.35")
    ax.set_xlim(min(result.layers) - 0.5, max(result.layers) + 0.5)
    ax.set_xlabel("layer")
    ax.set_ylabel(_axis_label(metric))
    spread = {"std": "± 1 std", "minmax": "min-max", "ci": "95% bootstrap CI of the mean"}[band]
    ax.set_title(f"{_label(result)}: {metric} of each block's writes, base vs SFT (mean over tokens, band {spread})",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return figure


def logit_lens_curves(result, *, band: str | None = None):
    """The logit lens by layer, two axes: left, how far the two models' predictions are apart
    (``kl_sft_base`` and ``js``, log) and how far each model's layer is from its own output
    (``base_kl_to_final``, ``sft_kl_to_final``, dashed); right, the share of tokens whose top
    prediction agrees (``top1_agree``).

    ``band`` defaults to the 95% bootstrap interval of the mean (``ci``; ``std`` for a run
    without intervals): divergences are skewed, and mean - std falls below 0 on a log axis."""
    if "logit_lens" not in [a.name for a in result.analyses()]:
        raise LensCompareError("this run has no logit lens: it ran with --no-logit-lens (logit_lens='off'), or "
                               "its models' logits cannot be lensed (see provenance.logit_lens.reason)")
    if len(result.analysis_records("logit_lens")) == 1:
        return _one_layer_lens(result)
    if band is None:
        first = result.analysis_records("logit_lens")[0]["kl_sft_base"] or {}
        band = "ci" if first.get("ci_low") is not None else "std"
    figure, (left, right) = _subplots((11.0, 3.8), 2)
    colours = _matplotlib().rcParams["axes.prop_cycle"].by_key()["color"]
    records = result.analysis_records("logit_lens")
    layers = np.array([r["layer"] for r in records])
    drawn = []
    for index, (key, style) in enumerate((("kl_sft_base", "-"), ("js", "-"), ("base_kl_to_final", "--"),
                                          ("sft_kl_to_final", "--"))):
        stats = [r[key] or {} for r in records]
        mean, low, high = (np.array([st.get(k) if st.get(k) is not None else np.nan for st in stats], dtype=float)
                           for k in _band_keys(band))
        if band == "std":
            low, high = mean - low, mean + low
        shown = np.where(mean > 0, mean, np.nan)
        drawn.append(shown)
        left.plot(layers, shown, style, color=colours[index], lw=1.8, marker=".", ms=4, label=key)
        left.fill_between(layers, np.where(low > 0, low, LOG_FLOOR), np.where(high > 0, high, np.nan),
                          color=colours[index], alpha=0.1, lw=0)
    left.set_yscale("log")
    positive = np.concatenate([d[np.isfinite(d)] for d in drawn])
    left.set_ylim(*((positive.min() / 5, None) if positive.size else (LOG_FLOOR, 1.0)))
    left.set_ylabel("nats (log)")
    left.set_title("divergences (KL(p_sft || p_base), JS; each model's KL from its own output)", fontsize=9)
    left.text(0.01, 0.02, "0 is not drawn on a log axis", transform=left.transAxes, fontsize=7, color="0.35")
    stats = [r["top1_agree"] or {} for r in records]
    mean, low, high = (np.array([st.get(k) if st.get(k) is not None else np.nan for st in stats], dtype=float)
                       for k in _band_keys(band))
    if band == "std":
        low, high = mean - low, mean + low
    right.plot(layers, mean, "-", color=colours[4 % len(colours)], lw=1.8, marker=".", ms=4)
    right.fill_between(layers, np.clip(low, 0, 1), np.clip(high, 0, 1), color=colours[4 % len(colours)], alpha=0.12,
                       lw=0)
    right.set_ylim(-0.02, 1.02)
    right.set_ylabel("top1_agree")
    right.set_title("share of tokens whose top prediction agrees", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("layer")
        ax.set_xlim(min(result.layers) - 0.5, max(result.layers) + 0.5)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="best")
    spread = {"std": "± 1 std", "minmax": "min-max", "ci": "95% bootstrap CI of the mean"}[band]
    figure.suptitle(f"{_label(result)}: logit lens through each model's own final norm and unembedding "
                    f"(mean over tokens, band {spread})", fontsize=10)
    return figure


def _one_layer_lens(result):
    """The lens at one layer (a default run's: the models' outputs): every token's KL(p_sft || p_base)
    and JS by prompt (log), and each prompt's share of tokens whose top prediction agrees, each
    with the run's mean and its 95% bootstrap interval. A saved run without its token table: the
    means and intervals alone."""
    record = result.analysis_records("logit_lens")[0]
    layer = record["layer"]
    at_output = layer == result.provenance.n_layers - 1
    figure, (left, right) = _subplots((11.0, 3.8), 2)
    colours = _matplotlib().rcParams["axes.prop_cycle"].by_key()["color"]
    n_prompts = len(result.tokens.token_ids)
    prompts = np.arange(n_prompts)
    values = result.analysis_metrics if result.metrics is not None else {}
    mask = result.positions_mask(aggregated_positions(result.include_first_token)).numpy()
    for index, key in enumerate(("kl_sft_base", "js")):
        colour, shift = colours[index], (index - 0.5) * 0.3
        if key in values:
            grid = values[key][0].numpy()
            for prompt in prompts:
                tokens = grid[prompt][mask[prompt]]
                shown = tokens[tokens > 0]
                left.plot(np.full(shown.shape, prompt + shift) + np.linspace(-0.08, 0.08, shown.size), shown, ".",
                          color=colour, ms=3, alpha=0.5)
        stats = record[key] or {}
        if stats.get("mean"):
            low, high = stats.get("ci_low"), stats.get("ci_high")
            left.axhline(stats["mean"], color=colour, lw=1.5,
                         label=f"{key}: mean {stats['mean']:.3g}" + (f" (95% CI {low:.3g}-{high:.3g})" if low else ""))
            if low and high and low > 0:
                left.axhspan(low, high, color=colour, alpha=0.12, lw=0)
    left.set_yscale("log")
    left.set_xticks(prompts, [str(p) for p in prompts])
    left.set_xlabel("prompt (each dot a token; 0 is not drawn on a log axis)")
    left.set_ylabel("nats (log)")
    left.set_title("KL(p_sft || p_base) and JS, token by token", fontsize=9)
    left.legend(fontsize=8, loc="best")
    stats = record["top1_agree"] or {}
    if "top1_agree" in values:
        grid = values["top1_agree"][0].numpy()
        shares = [float(grid[p][mask[p]].mean()) if mask[p].any() else np.nan for p in prompts]
        right.bar(prompts, shares, color=colours[4 % len(colours)], alpha=0.6, label="each prompt's tokens")
    if stats.get("mean") is not None:
        right.axhline(stats["mean"], color="0.2", lw=1.5, label=f"all tokens: {stats['mean']:.1%}")
        if stats.get("ci_low") is not None:
            right.axhspan(stats["ci_low"], stats["ci_high"], color="0.2", alpha=0.12, lw=0, label="95% CI")
    right.set_ylim(0, 1.02)
    right.set_xticks(prompts, [str(p) for p in prompts])
    right.set_xlabel("prompt")
    right.set_ylabel("top1_agree")
    right.set_title("share of tokens whose top prediction agrees", fontsize=9)
    right.legend(fontsize=8, loc="best")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    where = f"the models' outputs (layer {layer})" if at_output else f"layer {layer}"
    figure.suptitle(f"{_label(result)}: next-token distributions at {where}, base vs SFT "
                    "(--logit-lens all draws every layer)", fontsize=10)
    return figure


def cka_matrix(result, estimator: str = "linear", *, ax=None):
    """The layer x layer CKA matrix (``--cka``): base layers down, SFT layers across, with the
    best-aligned SFT layer of each base layer marked. A diagonal of 1 is a fine-tune that kept
    every layer's geometry."""
    if result.cka is None:
        raise LensCompareError("this run has no CKA: run it with --cka (compare(cka=True))")
    if estimator not in ("linear", "linear_debiased"):
        raise LensCompareError(f"estimator {estimator!r}: expected 'linear' or 'linear_debiased'")
    figure, ax = (_subplots((6.2, 5.2)) if ax is None else (ax.figure, ax))
    values = np.array([[np.nan if v is None else v for v in row] for row in result.cka[estimator]], dtype=float)
    layers = result.cka["layers"]
    image = ax.imshow(values, cmap="viridis", vmin=min(0.0, np.nanmin(values)), vmax=1.0, origin="upper",
                      aspect="auto")
    best = np.nanargmax(np.where(np.isfinite(values), values, -np.inf), axis=1)
    ax.plot(best, np.arange(len(layers)), "w.", ms=5, label="best-aligned SFT layer")
    ticks = np.arange(len(layers))[:: max(1, len(layers) // 10)]
    ax.set_xticks(ticks, [layers[i] for i in ticks])
    ax.set_yticks(ticks, [layers[i] for i in ticks])
    ax.set_xlabel("SFT layer (resid_post)")
    ax.set_ylabel("base layer (resid_post)")
    ax.set_title(f"{_label(result)}: {estimator.replace('_', ' ')} CKA over {result.cka['n_tokens']} tokens",
                 fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    figure.colorbar(image, ax=ax, label="CKA")
    return figure


def steering_curves(result, metric: str = "fraction_kl", *, ax=None):
    """The steering check (``--steer``): the fraction of the fine-tune's KL (``fraction_kl``) or
    top-1 disagreement (``fraction_top1``) that adding α·δ_l to the base model removes, against the
    steered layer, one line per α (1: steering there turns the base model into the SFT one): solid
    on the run's prompts, dashed in the same colour on the held-out prompts (``--steer-prompts``)."""
    if metric not in ("fraction_kl", "fraction_top1"):
        raise LensCompareError(f"metric {metric!r}: expected 'fraction_kl' or 'fraction_top1'")
    frame = result.steering()
    figure, ax = (_subplots((6.2, 4.0)) if ax is None else (ax.figure, ax))
    held_out = (frame["prompts"] == "held_out").any()
    for index, (alpha, by_alpha) in enumerate(frame.groupby("alpha", sort=True)):
        for prompts, style in (("run", "-"), ("held_out", "--")):
            rows = by_alpha[by_alpha["prompts"] == prompts]
            if rows.empty:
                continue
            label = f"α = {alpha:g}" + ((", run" if prompts == "run" else ", held-out") if held_out else "")
            ax.plot(rows["layer"], rows[metric], marker="o" if prompts == "run" else "s", ls=style,
                    color=f"C{index}", label=label)
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xlabel("steered layer (resid_post)")
    ax.set_ylabel("fraction explained" + (" (KL)" if metric == "fraction_kl" else " (top-1)"))
    ax.set_title(f"{_label(result)}: base + α·δ against the SFT model", fontsize=10)
    ax.legend(fontsize=7)
    return figure


# What each difference-lens reading is, for a figure's title.
READING_TITLES = {
    "base": "read by the base model, W_U_base · norm_base(δ)",
    "sft": "read by the SFT model, W_U_sft · norm_sft(δ)",
    "logit_difference": "lens_sft(mean SFT state) - lens_base(mean base state)",
}


def difference_lens_table(result, reading: str = "base", positions: str = "rest", *, ax=None):
    """The difference lens as a layer x rank table (``--difference-lens``): per layer, the tokens the
    mean SFT-minus-base shift δ over ``positions`` promotes most (left, rank 1 first) and suppresses
    most (right), each cell the token's text coloured by its logit on a scale centred on 0 (red:
    raised, blue: lowered). ``reading``: ``base``, ``sft`` or ``logit_difference`` (see
    ``lens_compare.analyses.difference_lens``). A layer where both models' states agree exactly has
    no shift to read: a grey row."""
    frame = result.difference_lens()
    if reading not in READING_TITLES:
        raise LensCompareError(f"reading {reading!r}: expected one of {list(READING_TITLES)}")
    held = [str(p) for p in frame["positions"].unique()] or ["rest"]
    records = [r for r in result.difference_lens_records if r["reading"] == reading and r["positions"] == positions]
    if not records:
        raise LensCompareError(f"positions {positions!r}: this run's difference lens covers {held}")
    k = max((len(r["promoted"]) for r in records), default=0) or int(result.provenance.difference_lens["top"])
    layers = [r["layer"] for r in records]
    values = np.full((len(records), 2 * k + 1), np.nan)
    texts: dict[tuple[int, int], str] = {}
    for row, record in enumerate(records):
        for offset, direction in ((0, "promoted"), (k + 1, "suppressed")):
            for rank, item in enumerate(record[direction]):
                values[row, offset + rank] = item["logit"]
                # A control character (a byte token's) has no glyph: its escape instead.
                token = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in item["token"])
                texts[row, offset + rank] = token if len(token) <= 10 else token[:9] + "…"
    size = (max(7.0, 0.78 * (2 * k + 1) + 2.2), 0.32 * len(records) + 1.8)
    figure, ax = _subplots(size) if ax is None else (ax.figure, ax)
    from matplotlib.colors import TwoSlopeNorm

    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-limit or -1.0, vmax=limit or 1.0)
    cmap = _matplotlib().colormaps["RdBu_r"].with_extremes(bad="0.88")
    image = ax.imshow(np.ma.masked_invalid(values), aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    ax.axvspan(k - 0.5, k + 0.5, color="white", zorder=2)  # the gap between the two halves
    for (row, column), token in texts.items():
        dark = abs(values[row, column]) > 0.6 * limit
        ax.text(column, row, token, ha="center", va="center", fontsize=6.5, color="white" if dark else "black")
    ranks = [str(r) for r in range(1, k + 1)]
    ax.set_xticks(range(2 * k + 1), [*ranks, "", *ranks], fontsize=7)
    ax.set_yticks(range(len(records)), [str(layer) for layer in layers], fontsize=7)
    flat = any(not record["promoted"] for record in records)
    ax.set_xlabel("rank: promoted (left), suppressed (right)"
                  + ("; grey rows: δ = 0, both models' states agree exactly" if flat else ""), fontsize=8)
    ax.set_ylabel("layer (resid_post)")
    n_tokens = (result.provenance.difference_lens or {}).get("n_tokens", {}).get(positions)
    ax.set_title(f"{_label(result)}: difference lens over {positions}"
                 + (f" ({n_tokens} tokens)" if n_tokens else "") + f", {READING_TITLES[reading]}", fontsize=9)
    label = "logit difference" if reading == "logit_difference" else "logit of the shift's direction"
    figure.colorbar(image, ax=ax, label=label, shrink=0.8)
    return figure


def _band_keys(band: str) -> tuple[str, str, str]:
    """The record fields of the mean and of a band's two edges (for ``std``: the std, twice)."""
    if band not in ("std", "minmax", "ci"):
        raise LensCompareError(f"band {band!r}: expected 'std', 'minmax' or 'ci'")
    return {"std": ("mean", "std", "std"), "minmax": ("mean", "min", "max"), "ci": ("mean", "ci_low", "ci_high")}[band]


def position_heatmap(result, metric: str, prompt: int, *, hook: str = "resid_post", ax=None):
    """``metric`` at every captured layer x position of one prompt, with its tokens on the x axis."""
    if result.metrics is None:
        raise LensCompareError("a heatmap needs per-token metrics: load a run saved with --parquet or --csv")
    if not 0 <= prompt < len(result.tokens.token_ids):
        raise LensCompareError(f"prompt {prompt}: this run has prompts 0..{len(result.tokens.token_ids) - 1}")
    length = len(result.tokens.token_ids[prompt])
    values = result.metrics[hook][metric][:, prompt, :length].numpy()
    size = (max(6.0, 0.32 * length + 2), 0.22 * len(result.layers) + 2)
    figure, ax = _subplots(size) if ax is None else (ax.figure, ax)
    shown = 1.0 - values if metric in ONE_MINUS else values
    # A log colour scale where the line plots use a log axis: one outlying token (an attention
    # sink, say) would otherwise flatten every other cell into one colour. Exact zeros
    # (identical in both models) cannot be drawn on it and are grey.
    cmap = _matplotlib().colormaps["viridis"].with_extremes(bad="lightgrey")
    norm, label = None, _axis_label(metric).removesuffix(" (log)")
    positive = shown[np.isfinite(shown) & (shown > 0)]
    if (metric in ONE_MINUS or metric in LOG_SCALE) and positive.size:
        from matplotlib.colors import LogNorm

        norm = LogNorm(vmin=max(float(positive.min()), LOG_FLOOR), vmax=float(positive.max()))
        label += " (log" + ("; grey: 0, identical)" if (shown == 0).any() else ")")
    image = ax.imshow(shown, aspect="auto", origin="lower", cmap=cmap, norm=norm, interpolation="nearest")
    figure.colorbar(image, ax=ax, label=label)
    # Token strings are readable (lens_compare.models.tokens.readable_tokens); runs saved before that hold
    # raw byte-level BPE, whose "Ġ" (a leading space) and "Ċ" (a newline) read ␣ and ↵ here too.
    tokens = [t.replace("Ġ", "␣").replace("Ċ", "↵").replace("\n", "↵") for t in result.token_strings[prompt][:length]]
    ax.set_xticks(range(length), tokens, rotation=90, fontsize=7)
    ax.set_yticks(range(len(result.layers)), [str(layer) for layer in result.layers], fontsize=7)
    ax.set_xlabel("position (token)")
    ax.set_ylabel("layer")
    ax.set_title(f"{_label(result)}: {_axis_label(metric).removesuffix(' (log)')} at {hook}, prompt {prompt}",
                 fontsize=10)
    return figure


def norm_profile(result, *, hook: str = "resid_post", ax=None):
    """Both models' mean residual norm by layer (log scale), with a ± 1 std band."""
    figure, ax = (_subplots((7.5, 4.0)) if ax is None else (ax.figure, ax))
    for name, style in (("base_norm", "-"), ("sft_norm", "--")):
        # min-max, not ± std: norms are positive and a std band would run off the log axis.
        layers, mean, low, high = _series(result, hook, name, "minmax")
        ax.plot(layers, mean, style, lw=1.8, marker=".", ms=4, label=f"{name.split('_')[0]} model")
        ax.fill_between(layers, low, high, alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"‖{hook}‖ (log)")
    ax.set_title(f"{_label(result)}: residual norm by layer (mean, band min-max over tokens)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def training_curve(report: dict[str, Any], *, window: int = 5, ax=None):
    """A demo fine-tune's loss on answer tokens by step (``lens_compare.demo.fine_tune``'s report), with
    its running mean over ``window`` steps; the title gives held-out exact-match accuracy."""
    figure, ax = (_subplots((7.5, 4.0)) if ax is None else (ax.figure, ax))
    losses = np.asarray(report["losses"], dtype=float)
    steps = np.arange(len(losses))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, marker=".", ms=3, label="batch loss")
    if len(losses) >= window:
        running = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], running, lw=2, label=f"mean of last {window} steps")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter

    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set_xlabel("training step")
    ax.set_ylabel("cross-entropy on answer tokens (nats, log)")
    before, after = report["before"]["exact_overall"], report["after"]["exact_overall"]
    recipe = report["recipe"]
    ax.set_title(f"{recipe['name']}: SFT loss, {recipe['batch_size']} examples/step; held-out exact match "
                 f"{before:.0%} -> {after:.0%}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return figure


def save_figure(figure, path: Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (atomically). A token whose script the font lacks (the
    difference lens lists CJK tokens) is drawn as boxes, without a warning per glyph."""
    import warnings

    from lens_compare.util.outputs import write_atomically

    def save(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
            figure.savefig(tmp, format="png", dpi=110)

    return write_atomically(Path(path), save)


STANDARD = ("cosine", "relative_l2", "norms", "cosine_prev", "components", "logit_lens", "difference_lens", "cka",
            "heatmap")


def standard_figures(result, noise_floor: Any = None) -> dict[str, Any]:
    """The figures ``--plots`` writes: name -> Figure. The noise band is ``noise_floor``, else the
    run's own (``--noise-floor``), if any."""
    if noise_floor is None:
        noise_floor = result.noise_floor
    figures = {
        "cosine": layer_curves([result], "cosine", noise_floor=noise_floor),
        "relative_l2": layer_curves([result], "relative_l2", noise_floor=noise_floor),
        "norms": norm_profile(result),
        "cosine_prev": layer_curves([result], "cosine_prev"),
    }
    if "components" in [a.name for a in result.analyses()]:
        figures["components"] = sublayer_curves(result, "relative_l2")
    if "logit_lens" in [a.name for a in result.analyses()]:
        figures["logit_lens"] = logit_lens_curves(result)
    if result.difference_lens_records:
        figures["difference_lens"] = difference_lens_table(result)
    if result.steering_records:
        figures["steering"] = steering_curves(result)
    if result.cka is not None:
        figures["cka"] = cka_matrix(result)
    if result.metrics is not None:
        figures["heatmap"] = position_heatmap(result, "relative_l2", prompt=0)
    return figures


def save_standard_figures(result, stem: Path, noise_floor: Any = None) -> list[Path]:
    """Write the standard figures as ``<stem>.<name>.png`` (atomically); returns the paths."""
    return [save_figure(figure, stem.with_name(f"{stem.name}.{name}.png"))
            for name, figure in standard_figures(result, noise_floor).items()]
