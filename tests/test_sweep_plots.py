"""The sweep's study figures: what each draws equals the runs it reads, an identical pair keeps the
log scales valid, and a sweep with nothing done writes nothing and says why."""

import io
import logging

import numpy as np
import pytest

from lens_compare import RunConfig
from lens_compare.errors import LensCompareError
from lens_compare.models.load_options import LoadOptions
from lens_compare.pipeline.execution import Execution
from lens_compare.results.saved import load_run
from lens_compare.sweeps.figures import depth_heatmap, pair_curves, run_costs, save_sweep_figures
from lens_compare.sweeps.index import SweepEntry, SweepIndex
from lens_compare.sweeps.local import run_sweep

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

PROMPTS = ("the quick brown fox jumps over the lazy dog and runs into the old forest",
           "a model of the world is only as good as the data it has seen so far today",
           "hello world, this is a test of the sweep over several token lengths at once")
LENGTHS = (6, 12)


def _cpu(facts):
    options = LoadOptions("float32", "cpu")
    return Execution("resident", "resident", {"base": options, "sft": options})


@pytest.fixture(scope="module")
def index(perturbed_llama, tmp_path_factory) -> SweepIndex:
    """Two pairs at 6 and 12 tokens: ``tiny`` (block 1 perturbed) and ``same`` (a model against itself)."""
    base, sft, _ = perturbed_llama
    root = tmp_path_factory.mktemp("sweep_plots")
    pairs_file = root / "pairs.yaml"
    pairs_file.write_text(f"pairs:\n  tiny:\n    base: {base}\n    sft: {sft}\n"
                          f"  same:\n    base: {base}\n    sft: {base}\n")
    config = RunConfig(pairs_file=str(pairs_file), prompts=PROMPTS, batch_size=2, bootstrap=50)
    index = run_sweep(["tiny", "same"], LENGTHS, config, root / "out", preflight=_cpu)
    assert {(e.pair, e.tokens): e.status for e in index.entries.values()} == dict.fromkeys(
        [("same", 6), ("same", 12), ("tiny", 6), ("tiny", 12)], "done")
    return index


def _summary(index, pair, tokens):
    """layers, n_layers and the resid_post relative_l2 rows of one run, read from its JSON."""
    result = load_run(index.folder / index.entries[(pair, tokens)].json)
    rows = result.summary(hook="resid_post", metric="relative_l2", positions="rest")
    return rows, result.provenance.n_layers


def _expected_cells(index, pair, tokens, bins=20):
    rows, n_layers = _summary(index, pair, tokens)
    by_bin = {}
    for layer, mean in zip(rows["layer"], rows["mean"], strict=True):
        by_bin.setdefault(int(np.floor(layer / n_layers * bins)), []).append(mean)
    return [float(np.mean(by_bin[b])) if b in by_bin else np.nan for b in range(bins)]


def _drawn(figure, which=0):
    return np.ma.filled(np.ma.asarray(figure.axes[0].images[which].get_array(), dtype=float), np.nan)


def _ydata(line):
    return np.asarray(line.get_ydata(), dtype=float)


@pytest.mark.parametrize("tokens", [None, 6])
def test_heatmap_cells_are_each_pairs_means_binned_by_relative_depth(index, tokens):
    figure = depth_heatmap(index, tokens)
    shown = 12 if tokens is None else tokens  # the longest done length by default
    expected = np.array([_expected_cells(index, pair, shown) for pair in ("same", "tiny")])
    drawn = _drawn(figure)
    assert drawn.shape == (2, 20)
    np.testing.assert_allclose(drawn, expected, rtol=1e-12, equal_nan=True)
    assert np.isfinite(drawn).sum() == 2 * 3, "three layers: three of the 20 columns hold a value"
    assert (expected[1][np.isfinite(expected[1])] > 0).any(), "the perturbed pair differs somewhere"
    ax = figure.axes[0]
    assert [label.get_text() for label in ax.get_yticklabels()] == ["same (3 layers)", "tiny (3 layers)"]
    assert f"at {shown} tokens" in ax.get_title()
    assert len(figure.axes) == 2 and "log" in figure.axes[1].get_ylabel(), "a colour bar, log scale"


def test_heatmap_draws_exact_zeros_grey_and_refuses_a_length_the_sweep_lacks(index):
    figure = depth_heatmap(index)
    norm = figure.axes[0].images[0].norm
    assert type(norm).__name__ == "LogNorm" and 0 < norm.vmin <= norm.vmax
    zeros = _drawn(figure, 1)
    assert np.isfinite(zeros[0]).sum() == 3, "every layer of the identical pair is a grey cell"
    assert "grey: 0 (identical residuals)" in figure.axes[0].get_xlabel()
    with pytest.raises(LensCompareError, match=r"tokens=7: .*done lengths: \[6, 12\]"):
        depth_heatmap(index, 7)


def test_curves_one_panel_per_pair_one_line_per_length_with_the_runs_means(index):
    figure = pair_curves(index)
    assert [ax.get_title() for ax in figure.axes] == ["same (3 layers)", "tiny (3 layers)"]
    for ax, pair in zip(figure.axes, ("same", "tiny"), strict=True):
        assert ax.get_yscale() == "log"
        assert [line.get_label() for line in ax.get_lines()] == ["6 tokens", "12 tokens"]
        for line, tokens in zip(ax.get_lines(), LENGTHS, strict=True):
            rows, n_layers = _summary(index, pair, tokens)
            np.testing.assert_allclose(np.asarray(line.get_xdata(), dtype=float), rows["layer"] / n_layers)
            mean = rows["mean"].to_numpy(dtype=float)
            np.testing.assert_allclose(_ydata(line)[mean > 0], mean[mean > 0])
            assert np.isnan(_ydata(line)[mean == 0]).all(), "0 is not drawn on the log axis"
        assert len(ax.collections) == 2, "a CI band per line"
    assert figure.axes[0].get_shared_y_axes().joined(figure.axes[0], figure.axes[1])
    assert any("identical residuals" in text.get_text() for text in figure.axes[0].texts)
    assert pair_curves(index, tokens=[12]).axes[1].get_lines()[0].get_label() == "12 tokens"


def test_an_identical_pair_alone_keeps_every_log_scale_valid(index):
    same = SweepIndex(index.folder, {key: entry for key, entry in index.entries.items() if key[0] == "same"})
    assert all(np.all(_summary(index, "same", tokens)[0]["mean"] == 0) for tokens in LENGTHS)
    heatmap = depth_heatmap(same)
    norm = heatmap.axes[0].images[0].norm
    assert 0 < norm.vmin < norm.vmax
    curves = pair_curves(same)
    low, high = curves.axes[0].get_ylim()
    assert curves.axes[0].get_yscale() == "log" and 0 < low < high
    for figure in (heatmap, curves):
        figure.savefig(io.BytesIO(), format="png")  # draws without a log-scale error


def test_costs_one_bar_per_run_and_bars_read_off_a_longer_capture_are_hatched(index):
    figure = run_costs(index)
    ax = figure.axes[0]
    bars = [patch for container in ax.containers for patch in container]
    done = [entry for _, entry in sorted(index.entries.items())]
    assert len(bars) == len(done) == 4
    for bar, entry in zip(bars, done, strict=True):
        assert bar.get_height() == pytest.approx(entry.seconds)
        assert bool(bar.get_hatch()) == (entry.captured_at != entry.tokens)
    assert [entry.tokens for entry in done if entry.captured_at != entry.tokens] == [6, 6]
    # Both lengths of a pair share one capture's seconds.
    assert {entry.pair: entry.seconds for entry in done if entry.tokens == 6} == \
        {entry.pair: entry.seconds for entry in done if entry.tokens == 12}
    legend = [text.get_text() for text in ax.figure.legends[0].get_texts()]
    assert legend[:2] == ["6 tokens", "12 tokens"] and "read off a longer capture" in legend[2]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["same", "tiny"]


def test_save_sweep_figures_writes_the_three_pngs(index):
    paths = save_sweep_figures(index)
    assert [path.name for path in paths] == ["sweep.heatmap.png", "sweep.curves.png", "sweep.costs.png"]
    for path in paths:
        assert path.parent == index.folder and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sweep_without_a_done_run_writes_nothing_and_says_why(tmp_path, caplog):
    index = SweepIndex(tmp_path)
    index.record(SweepEntry("broken", 6, "failed", reason="OSError: no such checkpoint"))
    with caplog.at_level(logging.WARNING, logger="lens_compare"):
        assert save_sweep_figures(index) == []
    assert "no done run" in caplog.text and "nothing to draw" in caplog.text
    assert not list(tmp_path.glob("*.png"))
    for draw in (depth_heatmap, pair_curves, run_costs):
        with pytest.raises(LensCompareError, match="has no done run: nothing to draw"):
            draw(index)
