"""The study's figures from a sweep folder (optional extra ``plots``: matplotlib): where in depth
each pair's SFT model departs from its base, how that depends on the token length, and what
each run cost.

Each reads ``OUT/sweep.json`` and the JSON of every done run. Pairs with different layer counts
line up on relative depth: ``layer / n_layers`` (0 is the first block's output, 1 - 1/n_layers
the last's). ``relative_l2`` is drawn on a log scale, as ``lens_compare.plots`` draws it.

>>> from lens_compare.sweeps import figures
>>> index = SweepIndex.open("outputs/study")                  # doctest: +SKIP
>>> figures.depth_heatmap(index)                              # doctest: +SKIP
>>> figures.save_sweep_figures(index)                         # doctest: +SKIP
"""

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lens_compare.errors import LensCompareError
from lens_compare.metrics.aggregate import aggregated_positions
from lens_compare.plots import LOG_FLOOR, _matplotlib, _subplots, save_figure
from lens_compare.results.saved import load_run
from lens_compare.sweeps.index import SweepEntry, SweepIndex

logger = logging.getLogger("lens_compare")

HOOK, METRIC = "resid_post", "relative_l2"
# Relative-depth bins of the heatmap: real pairs have 24 to 80 layers, so each bin holds one to four.
DEPTH_BINS = 20
FIGURES = ("heatmap", "curves", "costs")


@dataclass(frozen=True)
class DepthCurve:
    """One done run's resid_post relative_l2 by layer: the per-layer mean over tokens and its 95%
    bootstrap interval (NaN where the run has none)."""

    pair: str
    tokens: int
    n_layers: int
    layers: np.ndarray
    mean: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray

    @property
    def depth(self) -> np.ndarray:
        return self.layers / self.n_layers


def _done(index: SweepIndex) -> list[SweepEntry]:
    return [entry for _, entry in sorted(index.entries.items()) if entry.status == "done"]


def depth_curves(index: SweepIndex) -> list[DepthCurve]:
    """Every done run's curve, by pair then token length."""
    curves = []
    for entry in _done(index):
        result = load_run(index.folder / entry.json)
        rows = result.summary(hook=HOOK, metric=METRIC, positions=aggregated_positions(result.include_first_token))
        columns = (rows[name].to_numpy(dtype=float, na_value=np.nan) for name in ("mean", "ci_low", "ci_high"))
        curves.append(DepthCurve(entry.pair, entry.tokens, result.provenance.n_layers,
                                 rows["layer"].to_numpy(dtype=int), *columns))
    return curves


def _nothing_to_draw(index: SweepIndex, detail: str = "") -> LensCompareError:
    return LensCompareError(f"the sweep in {str(index.folder)!r} has no done run{detail}: nothing to draw "
                            "(see its sweep.json, or index.table())")


def binned_by_depth(curve: DepthCurve, bins: int = DEPTH_BINS) -> np.ndarray:
    """``bins`` cells of equal width in relative depth: layer ``l`` of ``n_layers`` falls in cell
    ``l * bins // n_layers`` (the cell covering ``[b / bins, (b + 1) / bins)``), and a cell holds
    the mean of its layers' values; NaN where no layer falls (a model with fewer layers than bins)."""
    cells = curve.layers * bins // curve.n_layers
    sums = np.bincount(cells, weights=curve.mean, minlength=bins)
    counts = np.bincount(cells, minlength=bins)
    with np.errstate(invalid="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _length_colours(lengths: Iterable[int]) -> dict[int, Any]:
    """One colour per token length (a name or an RGB tuple, as the style gives it), the same in every
    panel and in the costs figure."""
    colours = _matplotlib().rcParams["axes.prop_cycle"].by_key()["color"]
    return {tokens: colours[i % len(colours)] for i, tokens in enumerate(sorted(set(lengths)))}


def depth_heatmap(index: SweepIndex, tokens: int | None = None, *, bins: int = DEPTH_BINS):
    """Pairs (rows) x relative depth (columns) of resid_post relative_l2, mean over tokens, at one
    token length (default: the longest with a done run), on a log colour scale.

    Depth is binned so that pairs with different layer counts line up: ``bins`` columns of equal
    width over ``[0, 1)``, layer ``l`` of a model with ``L`` layers in column ``l * bins // L``, each
    cell the mean of the layers in it (``binned_by_depth``). A column no layer falls in is blank; a
    cell whose value is exactly 0 (identical residuals) is grey."""
    return _heatmap(depth_curves(index), index, tokens, bins)


def _heatmap(curves: list[DepthCurve], index: SweepIndex, tokens: int | None, bins: int):
    if not curves:
        raise _nothing_to_draw(index)
    tokens = max(curve.tokens for curve in curves) if tokens is None else tokens
    rows = [curve for curve in curves if curve.tokens == tokens]
    if not rows:
        done = sorted({curve.tokens for curve in curves})
        raise LensCompareError(f"tokens={tokens}: the sweep has no done run at that length; done lengths: {done}")
    values = np.array([binned_by_depth(curve, bins) for curve in rows])
    figure, ax = _subplots((8.0, 1.2 + 0.35 * len(rows)))
    positive = values[np.isfinite(values) & (values > 0)]
    from matplotlib.colors import ListedColormap, LogNorm

    # Without a positive value (every pair identical) the scale is the log axes' empty one.
    low, high = (float(positive.min()), float(positive.max())) if positive.size else (LOG_FLOOR, 1.0)
    cmap = _matplotlib().colormaps["viridis"].with_extremes(bad="white")
    extent = (0.0, 1.0, len(rows) - 0.5, -0.5)
    image = ax.imshow(values, aspect="auto", cmap=cmap, norm=LogNorm(vmin=low, vmax=high),
                      interpolation="nearest", extent=extent)
    zeros = values == 0
    if zeros.any():  # a log scale has no 0: these cells get a colour of their own
        ax.imshow(np.where(zeros, 1.0, np.nan), aspect="auto", cmap=ListedColormap(["lightgrey"]),
                  interpolation="nearest", extent=extent)
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    bar = figure.colorbar(image, ax=ax, label=f"{METRIC} (log)")
    bar.ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    # Within one decade only the minor ticks fall inside the bar; across several, labelling them
    # all would print them on top of each other.
    bar.ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g") if high / low < 10 else NullFormatter())
    notes = [text for text, shown in (("grey: 0 (identical residuals)", zeros.any()),
                                      ("blank: no layer at that depth", np.isnan(values).any())) if shown]
    ax.set_yticks(range(len(rows)), [f"{curve.pair} ({curve.n_layers} layers)" for curve in rows], fontsize=8)
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("; ".join([f"relative depth (layer / n_layers), {bins} bins", *notes]))
    ax.set_title(f"{HOOK} {METRIC} by relative depth at {tokens} tokens (mean over tokens)", fontsize=10)
    return figure


def pair_curves(index: SweepIndex, tokens: Sequence[int] | None = None):
    """Small multiples, one panel per pair: resid_post relative_l2 (mean over tokens) by relative
    depth with its 95% bootstrap interval, one line per token length (``tokens``: those lengths
    only), on one shared log y axis. A run without intervals (bootstrap=0) draws its line alone."""
    return _pair_curves(depth_curves(index), index, tokens)


def _pair_curves(curves: list[DepthCurve], index: SweepIndex, tokens: Sequence[int] | None):
    curves = [curve for curve in curves if tokens is None or curve.tokens in tokens]
    if not curves:
        raise _nothing_to_draw(index, "" if tokens is None else f" at tokens {list(tokens)}")
    pairs = sorted({curve.pair for curve in curves})
    columns = min(len(pairs), 4)
    grid_rows = -(-len(pairs) // columns)
    figure = _matplotlib().figure.Figure(figsize=(3.4 * columns + 0.6, 2.6 * grid_rows + 0.8), layout="constrained")
    axes = figure.subplots(grid_rows, columns, sharex=True, sharey=True, squeeze=False).ravel()
    for spare in axes[len(pairs):]:
        spare.remove()
    colours = _length_colours(curve.tokens for curve in curves)
    positive = []
    for ax, pair in zip(axes, pairs, strict=False):
        own = sorted((curve for curve in curves if curve.pair == pair), key=lambda curve: curve.tokens)
        drawn_here = 0
        for curve in own:
            shown = np.where(curve.mean > 0, curve.mean, np.nan)  # 0 (identical) has no place on a log axis
            positive.append(shown[np.isfinite(shown)])
            drawn_here += positive[-1].size
            colour = colours[curve.tokens]
            ax.plot(curve.depth, shown, "-", color=colour, lw=1.6, marker=".", ms=4, label=f"{curve.tokens} tokens")
            # A band reaching 0 runs off the bottom of the log axis, as in lens_compare.plots.
            ax.fill_between(curve.depth, np.where(curve.ci_low > 0, curve.ci_low, LOG_FLOOR),
                            np.where(curve.ci_high > 0, curve.ci_high, np.nan), color=colour, alpha=0.15, lw=0)
        if not drawn_here:
            ax.text(0.5, 0.5, f"{METRIC} is 0 at every layer:\nidentical residuals", transform=ax.transAxes,
                    ha="center", va="center", fontsize=8, color="0.3")
        ax.set_title(f"{pair} ({own[0].n_layers} layers)", fontsize=9)
        ax.grid(alpha=0.3)
    drawn = np.concatenate(positive)
    axes[0].set_yscale("log")
    axes[0].set_ylim(*((drawn.min() / 5, None) if drawn.size else (LOG_FLOOR, 1.0)))
    axes[0].set_xlim(-0.02, 1.0)
    for ax in axes[:len(pairs)]:
        ax.set_xlabel("relative depth (layer / n_layers)", fontsize=8)
        ax.set_ylabel(f"{METRIC} (log)", fontsize=8)
        ax.label_outer()
    handles = [_matplotlib().lines.Line2D([], [], color=colour, lw=1.6, marker=".", label=f"{length} tokens")
               for length, colour in colours.items()]
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    figure.suptitle(f"{HOOK} {METRIC} by relative depth (mean over tokens, band 95% CI; 0 is not drawn)",
                    fontsize=10)
    return figure


def run_costs(index: SweepIndex):
    """Wall seconds of each done run: a bar per run, grouped by pair, coloured by token length.
    Lengths read off a longer capture of the same pair (as prefixes) carry that capture's
    seconds, not time of their own: their bars are hatched."""
    done = [entry for entry in _done(index) if entry.seconds is not None]
    if not done:
        raise _nothing_to_draw(index)
    pairs = sorted({entry.pair for entry in done})
    lengths = sorted({entry.tokens for entry in done})
    colours = _length_colours(lengths)
    width = 0.8 / len(lengths)
    figure, ax = _subplots((max(6.0, 1.1 * len(pairs) * len(lengths) + 2.0), 4.0))
    for entry in done:
        shared = entry.captured_at not in (None, entry.tokens)
        x = pairs.index(entry.pair) + (lengths.index(entry.tokens) - (len(lengths) - 1) / 2) * width
        bars = ax.bar(x, entry.seconds, width * 0.95, color=colours[entry.tokens], edgecolor="0.25", lw=0.6,
                      hatch="//" if shared else None, alpha=0.55 if shared else 0.9)
        ax.bar_label(bars, [f"{entry.seconds:.0f}s" if entry.seconds >= 10 else f"{entry.seconds:.1f}s"],
                     fontsize=7, padding=2)
    patches = _matplotlib().patches
    handles = [patches.Patch(color=colour, label=f"{tokens} tokens") for tokens, colour in colours.items()]
    if any(entry.captured_at not in (None, entry.tokens) for entry in done):
        handles.append(patches.Patch(facecolor="white", edgecolor="0.25", hatch="//",
                                     label="read off a longer capture: its seconds, no time of its own"))
    # Below the axes, as the curves' legend: inside, it would cover the tallest bars' labels.
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    ax.set_xticks(range(len(pairs)), pairs, fontsize=8, rotation=30 if len(pairs) > 6 else 0)
    ax.set_ylabel("wall seconds")
    ax.set_ylim(0, max(entry.seconds for entry in done) * 1.15)
    ax.set_title(f"wall seconds per run ({len(done)} done runs)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    return figure


def save_sweep_figures(index: SweepIndex) -> list[Path]:
    """Write ``sweep.heatmap.png``, ``sweep.curves.png`` and ``sweep.costs.png`` into the sweep's
    folder (atomically); returns their paths. A sweep with no done run has nothing to draw: it
    writes nothing, logs why, and returns ``[]``."""
    curves = depth_curves(index)
    if not curves:
        logger.warning("sweep figures: no done run in %s, nothing to draw (see %s)", index.folder, index.path.name)
        return []
    figures = {"heatmap": _heatmap(curves, index, None, DEPTH_BINS), "curves": _pair_curves(curves, index, None),
               "costs": run_costs(index)}
    return [save_figure(figures[name], index.folder / f"sweep.{name}.png") for name in FIGURES]
