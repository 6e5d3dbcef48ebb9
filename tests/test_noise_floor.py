"""The run's own noise floor (--noise-floor): the SFT model against itself in a second precision."""

import json

import numpy as np
import pytest
import torch

import lens_compare
from lens_compare import plots
from lens_compare.capture.states import boot_bridge, capture_states
from lens_compare.engines.store import Kind, RunFolder
from lens_compare.errors import ConfigError
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.loading import load_config, load_hf_model, resolve_ref
from lens_compare.run import main
from lens_compare.util.hooks import states_for_layers

PROMPTS = ["the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding"]


def _states(directory, dtype, ids, real):
    ref = resolve_ref(str(directory))
    options = LoadOptions(dtype, "cpu")
    bridge = boot_bridge(load_hf_model(ref, load_config(ref), options), ref, None, options)
    layers = tuple(range(bridge.cfg.n_layers))
    return capture_states(bridge, ids, real, states_for_layers(layers), batch_size=2, label=dtype)


@pytest.mark.parametrize("dtype, second", [("float32", "bfloat16"), ("bfloat16", "float32")])
def test_floor_is_the_sft_model_against_itself_in_the_other_precision(perturbed_llama, dtype, second):
    base, sft, _ = perturbed_llama
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, dtype=dtype, noise_floor=True)
    floor = result.noise_floor
    assert floor.provenance["dtype"] == {"base": dtype, "sft": second}
    ids, real = result.tokens.padded(0)
    ours, theirs = (_states(sft, d, ids, real).values.double().numpy() for d in (dtype, second))
    with np.errstate(invalid="ignore"):  # padding: 0 / 0
        expected = np.linalg.norm(theirs - ours, axis=-1) / np.linalg.norm(ours, axis=-1)  # [state, prompt, pos]
    got = floor.metrics["resid_post"]["relative_l2"].double().numpy()
    np.testing.assert_allclose(got[:, real.numpy()], expected[1:][:, real.numpy()], rtol=1e-4, atol=1e-7)
    assert 1e-4 < np.nanmean(got) < 0.1, "a real floor: small but not zero"
    for record, noise in zip(result.layer_records()["resid_post"], floor.layer_records()["resid_post"], strict=True):
        assert record["clears_noise"] == pytest.approx(record["relative_l2"]["mean"] / noise["relative_l2"]["mean"])


def test_engines_json_dataframe_plots_and_saved_run(perturbed_llama, tmp_path, capsys):
    base, sft, block = perturbed_llama
    runs = {strategy: lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, noise_floor=True,
                                           strategy=strategy, shard_size=2 if strategy == "sequential" else None)
            for strategy in ("resident", "sequential", "stream")}
    for strategy in ("sequential", "stream"):
        for kind, metrics in runs["resident"].noise_floor.metrics.items():
            for name, values in metrics.items():
                real = runs["resident"].real_tokens  # padding differs with the shards' widths
                torch.testing.assert_close(runs[strategy].noise_floor.metrics[kind][name][:, real], values[:, real],
                                           equal_nan=True, atol=1e-5, rtol=1e-5)
    result = runs["resident"]
    document = result.to_dict()
    assert set(document["noise_floor"]) == {"model", "dtype", "resid_pre", "resid_post", "first_token"}
    assert all("clears_noise" in record for record in document["resid_post"])
    assert document["resid_post"][0]["clears_noise"] == 0.0  # identical block 0: no drift above any floor
    assert document["resid_post"][block]["clears_noise"] > 10
    summary = result.summary(metric="relative_l2", hook="resid_post", positions="rest")
    assert summary["clears_noise"].tolist() == pytest.approx([r["clears_noise"] for r in document["resid_post"]])

    labels = [c.get_label() for c in plots.standard_figures(result)["relative_l2"].axes[0].collections]
    assert any(label.startswith("noise floor: sft float32 vs bfloat16") for label in labels)

    assert main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--noise-floor", "--out", str(tmp_path), "-q"]) == 0
    capsys.readouterr()
    path = next(tmp_path.glob("*.json"))
    written = json.loads(path.read_text())
    loaded = lens_compare.load_run(path)
    assert loaded.to_dict()["noise_floor"] == written["noise_floor"]
    assert loaded.to_dict()["resid_post"] == written["resid_post"]
    # The saved floor: its records, not its per-token values.
    assert repr(loaded.noise_floor).startswith("ComparisonResult(noise floor")
    assert loaded.noise_floor.summary(hook="resid_post", metric="relative_l2", positions="rest")["mean"].tolist() \
        == pytest.approx([r["relative_l2"]["mean"] for r in written["noise_floor"]["resid_post"]])
    with pytest.raises(lens_compare.LensCompareError, match="keeps its noise floor's per-layer records only"):
        loaded.noise_floor.to_dataframe()
    assert plots.layer_curves([loaded.noise_floor], "relative_l2").axes


def test_the_noise_floor_is_a_result_of_its_own(perturbed_llama):
    """repr, summary(), to_dataframe() and the plots work on result.noise_floor."""
    from lens_compare import plots

    base, sft, _ = perturbed_llama
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, noise_floor=True)
    floor = result.noise_floor
    text = repr(floor)
    assert text.startswith("ComparisonResult(noise floor: the SFT model against itself in a second precision")
    assert f"base: {sft} (float32)" in text and f"sft:  {sft} (bfloat16)" in text
    summary = floor.summary(hook="resid_post", metric="relative_l2", positions="rest")
    assert summary["mean"].tolist() == pytest.approx(
        [r["relative_l2"]["mean"] for r in result.to_dict()["noise_floor"]["resid_post"]])
    table = floor.to_dataframe()
    values = floor.metrics["resid_post"]["relative_l2"]
    row = table.query("hook == 'resid_post' and metric == 'relative_l2' and layer == 1 and prompt == 0 "
                      "and position == 2")["value"]
    assert row.item() == pytest.approx(values[1, 0, 2].item())
    assert set(table["token"]) <= {t for strings in result.token_strings for t in strings}
    for figure in (plots.layer_curves([floor], "relative_l2"), plots.norm_profile(floor),
                   plots.position_heatmap(floor, "relative_l2", prompt=0), floor.plot("cosine")):
        assert figure.axes


def test_an_interrupted_floor_resumes_with_the_missing_shards_only(perturbed_llama, tmp_path, capsys, monkeypatch):
    base, sft, _ = perturbed_llama
    args = ["--base", str(base), "--sft", str(sft), *[a for p in PROMPTS for a in ("--prompt", p)],
            "--shard-size", "1", "--noise-floor", "-q"]
    assert main([*args, "--out", str(tmp_path / "clean")]) == 0
    clean = json.loads(next((tmp_path / "clean").glob("*.json")).read_text())
    original, calls = RunFolder.put, []

    def dying(self, kind, value, **parts):
        if kind is Kind.NOISE:
            if len(calls) == 1:
                raise KeyboardInterrupt
            calls.append(parts["shard"])
        return original(self, kind, value, **parts)

    def counting(self, kind, value, **parts):
        if kind is Kind.NOISE:
            calls.append(parts["shard"])
        return original(self, kind, value, **parts)

    monkeypatch.setattr(RunFolder, "put", dying)
    assert main([*args, "--out", str(tmp_path / "killed")]) == 130
    monkeypatch.setattr(RunFolder, "put", counting)
    assert main([*args, "--out", str(tmp_path / "killed")]) == 0
    assert calls == [0, 1, 2], "the second run measured only the two missing shards"
    resumed = json.loads(next((tmp_path / "killed").glob("*.json")).read_text())
    assert resumed["noise_floor"] == clean["noise_floor"] and resumed["resid_post"] == clean["resid_post"]
    folder = next((tmp_path / "killed" / "runs").iterdir())
    assert not (folder / "states").exists(), "the states kept for the floor are removed at the end"
    capsys.readouterr()


def test_nf4_runs_are_refused_before_loading(perturbed_llama):
    base, sft, _ = perturbed_llama
    with pytest.raises(ConfigError, match="NF4 copy instead"):
        lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, noise_floor=True, strategy="nf4")


def test_plan_refuses_a_floor_no_memory_can_hold(perturbed_llama, monkeypatch):
    from dataclasses import replace

    from lens_compare.errors import HardwareError
    from lens_compare.pipeline import preflight

    base, sft, _ = perturbed_llama
    small = replace(preflight.machine_for("cpu", ()), host_ram_gib=1e-4)
    monkeypatch.setattr(preflight, "machine_for", lambda device, gpus: replace(small, device_gib=10.0))
    with pytest.raises(HardwareError, match="--noise-floor runs the SFT model once more in bfloat16"):
        lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, noise_floor=True)
