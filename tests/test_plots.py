"""Figures: what they draw, that they compose and never show, and --plots."""

import sys

import numpy as np
import pytest

import lens_compare
from lens_compare import plots
from lens_compare.errors import LensCompareError

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world"]


@pytest.fixture(scope="module")
def runs(perturbed_llama):
    base, sft, _ = perturbed_llama
    changed = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS)
    same = lens_compare.compare(base=str(base), sft=str(base), prompts=PROMPTS, dtype="bfloat16")
    return changed, same


@pytest.fixture(autouse=True)
def never_show(monkeypatch):
    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("a plot function called plt.show()"))
    yield
    plt.close("all")


def test_layer_curves_log_scale_hook_styles_and_noise_band(runs):
    changed, same = runs
    figure = plots.layer_curves([changed], "relative_l2", noise_floor=same)
    ax = figure.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "layer"
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles == {"custom, resid_pre": "--", "custom, resid_post": "-"}
    post = next(line for line in ax.get_lines() if line.get_label().endswith("resid_post"))
    expected = changed.summary(hook="resid_post", metric="relative_l2", positions="rest")["mean"].to_numpy()
    drawn = np.asarray(post.get_ydata(), dtype=float)
    assert np.allclose(drawn[expected > 0], expected[expected > 0])
    assert np.isnan(drawn[expected == 0]).all()  # identical layers are not drawn on the log axis
    assert any("0 (identical" in text.get_text() for text in ax.texts)
    labels = [c.get_label() for c in ax.collections]
    assert any(label.startswith("noise floor: custom, resid_post") for label in labels)


def test_cosine_is_drawn_as_one_minus_on_a_log_axis_and_linear_metrics_stay_linear(runs):
    changed, _ = runs
    ax = plots.layer_curves([changed], "cosine").axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "1 - cosine (log)"
    post = next(line for line in ax.get_lines() if line.get_label().endswith("resid_post"))
    cosine = changed.summary(hook="resid_post", metric="cosine", positions="rest")["mean"].to_numpy()
    finite = cosine < 1
    assert np.allclose(np.asarray(post.get_ydata(), dtype=float)[finite], 1 - cosine[finite])
    assert plots.layer_curves([changed], "norm_delta").axes[0].get_yscale() == "linear"


def test_depth_diagnostics_side_by_side_and_figures_compose(runs):
    changed, same = runs
    figure = plots.layer_curves([changed, same], "cosine_prev")
    assert [ax.get_title() for ax in figure.axes] == ["base model", "sft model"]
    composed, axes = plt.subplots(1, 3)
    assert plots.layer_curves([changed], "relative_l2", ax=axes[0]) is composed
    assert plots.norm_profile(changed, ax=axes[1]) is composed
    assert plots.position_heatmap(changed, "cosine", prompt=0, ax=axes[2]) is composed


def test_heatmap_shows_the_prompts_tokens_and_values(runs):
    changed, _ = runs
    figure = plots.position_heatmap(changed, "relative_l2", prompt=0)
    ax = figure.axes[0]
    length = len(changed.tokens.token_ids[0])
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert len(labels) == length and labels[1] == changed.token_strings[0][1].replace("Ġ", "␣")
    image = ax.get_images()[0].get_array()
    expected = changed.metrics["resid_post"]["relative_l2"][:, 0, :length].numpy()
    assert np.allclose(np.ma.filled(image, np.nan), expected, equal_nan=True)
    with pytest.raises(LensCompareError, match="prompts 0..1"):
        plots.position_heatmap(changed, "cosine", prompt=5)


def test_norm_profile_has_both_models_on_a_log_axis(runs):
    changed, _ = runs
    ax = plots.norm_profile(changed).axes[0]
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.get_lines()] == ["base model", "sft model"]


def test_cli_plots_writes_the_standard_figures(perturbed_llama, tmp_path, capsys):
    from lens_compare.run import main

    base, sft, _ = perturbed_llama
    assert main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--plots", "--cka", "--out",
                 str(tmp_path), "-q"]) == 0
    written = [line for line in capsys.readouterr().out.split() if line.endswith(".png")]
    # The steering check's figure too: auto runs the check on this tiny pair (the planner says it
    # costs less than the run).
    assert sorted(p.rsplit(".", 2)[1] for p in written) == sorted((*plots.STANDARD, "steering"))
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_missing_matplotlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(LensCompareError, match=r"plots need matplotlib: pip install 'lens_compare\[plots\]'"):
        plots.require_matplotlib()


def test_identical_models_draw_empty_log_axes_without_error(runs, tmp_path):
    """The sanity pair: every relative_l2 and 1 - cosine is exactly 0, nothing positive to draw."""
    _, same = runs
    for name, figure in plots.standard_figures(same).items():
        figure.savefig(tmp_path / f"{name}.png")
    ax = plots.layer_curves([same], "relative_l2").axes[0]
    assert ax.get_yscale() == "log" and any("residuals are identical" in t.get_text() for t in ax.texts)
    assert ax.get_xlim() == (min(same.layers) - 0.5, max(same.layers) + 0.5)


def test_heatmap_of_a_log_metric_uses_a_log_colour_scale_and_marks_zeros(runs):
    from matplotlib.colors import LogNorm

    changed, _ = runs
    figure = plots.position_heatmap(changed, "relative_l2", prompt=0)
    image = figure.axes[0].get_images()[0]
    values = changed.metrics["resid_post"]["relative_l2"][:, 0, : len(changed.tokens.token_ids[0])].numpy()
    assert isinstance(image.norm, LogNorm)
    assert image.norm.vmin == pytest.approx(values[values > 0].min()) and image.norm.vmax == pytest.approx(values.max())
    assert (values == 0).any() and "grey: 0, identical" in figure.axes[1].get_ylabel()
    cosine = plots.position_heatmap(changed, "cosine", prompt=0).axes[0].get_images()[0]
    assert isinstance(cosine.norm, LogNorm)
    linear = plots.position_heatmap(changed, "base_norm", prompt=0).axes[0].get_images()[0]
    assert not isinstance(linear.norm, LogNorm)


def test_cli_reads_the_run_against_a_saved_noise_floor_run(perturbed_llama, tmp_path, capsys, caplog):
    """--noise-floor-run: the verdict gains the floor's column and the figures its band; a path that
    is not a run is refused before any model loads."""
    import logging

    from lens_compare.run import main

    base, sft, _ = perturbed_llama
    floor_dir, run_dir = tmp_path / "floor", tmp_path / "run"
    assert main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--out", str(floor_dir), "-q"]) == 0
    floor_json = next(floor_dir.glob("*.json"))
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        assert main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--plots", "--out", str(run_dir),
                     "--noise-floor-run", str(floor_json)]) == 0
    verdict = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("verdict:"))
    assert "noise floor: custom" in verdict and "x floor" in verdict
    assert any(row.split()[4] == "1.0" for row in verdict.splitlines()[3:-1])  # the same pair: ratio 1
    capsys.readouterr()
    (tmp_path / "not_a_run.json").write_text("[1, 2]")
    bad_files = ((tmp_path / "missing.json", "no run at"), (tmp_path / "not_a_run.json", "schema_version None"))
    for bad, message in bad_files:
        assert main(["--base", str(base), "--sft", str(sft), "--prompt", "hi", "--out", str(tmp_path / "x"),
                     "--noise-floor-run", str(bad)]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_sublayer_curves_draw_both_writes_and_the_stream(runs):
    changed, _ = runs
    ax = plots.sublayer_curves(changed, "relative_l2").axes[0]
    lines = {line.get_label().split(" ")[0]: line for line in ax.get_lines()}
    assert list(lines) == ["attn_out", "mlp_out", "resid_post"] and ax.get_yscale() == "log"
    for hook in ("attn_out", "mlp_out"):
        expected = changed.summary(hook=hook, metric="relative_l2", positions="rest")["mean"].to_numpy()
        drawn = np.asarray(lines[hook].get_ydata(), dtype=float)
        assert np.allclose(drawn[expected > 0], expected[expected > 0]) and np.isnan(drawn[expected == 0]).all()
    norms = plots.sublayer_curves(changed, "sft_norm").axes[0]
    assert norms.get_yscale() == "linear" and len(norms.get_lines()) == 2  # no stream line for a write's norm
    with pytest.raises(LensCompareError, match="the sublayer comparison has"):
        plots.sublayer_curves(changed, "norm_ratio")
    plain = lens_compare.compare(base=str(changed.provenance["base_model"]["location"]),
                                 sft=str(changed.provenance["base_model"]["location"]), prompts=PROMPTS[:1],
                                 components=False)
    assert "components" not in plots.standard_figures(plain)
    with pytest.raises(LensCompareError, match="--no-components"):
        plots.sublayer_curves(plain)


def test_logit_lens_curves_draw_the_records(runs, perturbed_llama):
    base, sft, _ = perturbed_llama
    changed = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, logit_lens="all")
    same = lens_compare.compare(base=str(base), sft=str(base), prompts=PROMPTS, dtype="bfloat16", logit_lens="all")
    figure = plots.logit_lens_curves(changed)
    left, right = figure.axes[:2]
    lines = {line.get_label(): np.asarray(line.get_ydata(), dtype=float) for line in left.get_lines()}
    assert list(lines) == ["kl_sft_base", "js", "base_kl_to_final", "sft_kl_to_final"] and left.get_yscale() == "log"
    kl = changed.summary(hook="resid_post", metric="kl_sft_base", positions="rest")["mean"].to_numpy()
    assert np.allclose(lines["kl_sft_base"][kl > 0], kl[kl > 0]) and np.isnan(lines["kl_sft_base"][kl == 0]).all()
    agree = changed.summary(hook="resid_post", metric="top1_agree", positions="rest")["mean"].to_numpy()
    assert np.allclose(np.asarray(right.get_lines()[0].get_ydata(), dtype=float), agree)
    plots.logit_lens_curves(same, band="ci")  # identical models: nothing positive on the log axis
    with pytest.raises(LensCompareError, match="band 'wide'"):
        plots.logit_lens_curves(changed, band="wide")


def test_a_lens_at_the_output_only_draws_its_tokens_and_prompts(runs):
    """The default lens (one layer, the outputs): each token's divergences by prompt, the mean and its
    interval, and each prompt's share of tokens whose top prediction agrees."""
    result = runs[0]
    record = result.analysis_records("logit_lens")[0]
    figure = plots.logit_lens_curves(result)
    left, right = figure.axes[:2]
    assert "next-token distributions at the models' outputs (layer 2)" in figure.get_suptitle()
    means = [line.get_ydata()[0] for line in left.get_lines() if line.get_label().startswith(("kl_sft_base", "js"))]
    assert means == pytest.approx([record["kl_sft_base"]["mean"], record["js"]["mean"]])
    agree = result.analysis_metrics["top1_agree"][0]
    mask = result.positions_mask("rest")
    shares = [float(agree[p][mask[p]].mean()) for p in range(len(PROMPTS))]
    assert [bar.get_height() for bar in right.patches[:len(PROMPTS)]] == pytest.approx(shares)


def test_cka_matrix_draws_the_run_matrix(perturbed_llama, runs):
    base, sft, _ = perturbed_llama
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, cka=True, logit_lens=False)
    ax = plots.cka_matrix(result, "linear_debiased").axes[0]
    drawn = np.asarray(ax.get_images()[0].get_array(), dtype=float)
    assert np.allclose(drawn, np.array(result.cka["linear_debiased"], dtype=float))
    assert ax.get_xlabel().startswith("SFT layer") and ax.get_ylabel().startswith("base layer")
    with pytest.raises(LensCompareError, match="run it with --cka"):
        plots.cka_matrix(runs[0])
