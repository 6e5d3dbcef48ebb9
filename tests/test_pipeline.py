"""The whole pipeline on tiny checkpoints: identical pairs, a one-block perturbation, outputs."""

import json
import math

import pytest
import torch

import lens_compare
from lens_compare.analyses.components import COMPONENT_METRICS
from lens_compare.analyses.logit_lens import LOGIT_LENS_KEYS
from lens_compare.metrics.residual import METRIC_NAMES
from lens_compare.results.result import SCHEMA_VERSION
from tests.fixtures.tiny_models import FAMILIES

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a b c d e f g"]


@pytest.mark.parametrize("family", FAMILIES)
def test_identical_models_give_cosine_one_everywhere(family, tiny_model_dirs):
    directory = str(tiny_model_dirs[family])
    result = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS, include_first_token=True)
    document = result.to_dict()
    for hook in ("resid_pre", "resid_post"):
        assert [r["layer"] for r in document[hook]] == [0, 1, 2]
        for record in document[hook]:
            assert abs(record["cosine"]["min"] - 1) <= 1e-6 and abs(record["cosine"]["max"] - 1) <= 1e-6
            for name in ("norm_delta", "relative_l2"):
                assert record[name] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
            assert record["norm_ratio"]["min"] == record["norm_ratio"]["max"] == 1.0
    assert document["resid_pre"][0]["base_cosine_prev"] is None
    assert document["resid_post"][0]["sft_norm_delta"] is None
    assert document["resid_pre"][1]["base_cosine_prev"] is not None


def test_one_perturbed_block_pins_the_layer_indexing(perturbed_llama):
    base, sft, block = perturbed_llama
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS)
    for layer_row, layer in enumerate(result.layers):
        for hook, same in (("resid_pre", layer <= block), ("resid_post", layer < block)):
            values = {name: result.metrics[hook][name][layer_row][result.real_tokens] for name in METRIC_NAMES}
            if same:
                assert torch.equal(values["norm_delta"], torch.zeros_like(values["norm_delta"])), (hook, layer)
                assert torch.equal(values["relative_l2"], torch.zeros_like(values["relative_l2"])), (hook, layer)
                assert torch.equal(values["base_norm"], values["sft_norm"])
                assert (values["cosine"] - 1).abs().max() <= 1e-6
                if not torch.isnan(values["base_cosine_prev"]).all():
                    assert torch.equal(values["base_cosine_prev"], values["sft_cosine_prev"])
            else:
                assert values["relative_l2"].min() > 1e-3, (hook, layer)
                assert (values["cosine"] - 1).abs().min() > 1e-6, (hook, layer)
                assert not torch.equal(values["base_norm"], values["sft_norm"])


def test_layer_subset_and_skip_first(tiny_model_dirs):
    directory = str(tiny_model_dirs["qwen2"])
    skipped = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS, skip_first=1)
    assert skipped.layers == (1, 2)
    doc = skipped.to_dict()
    assert doc["resid_pre"][0]["layer"] == 1 and doc["resid_pre"][0]["base_cosine_prev"] is None
    assert doc["resid_pre"][1]["base_cosine_prev"] is not None
    full = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS)
    subset = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS, layers=[2, 0])
    assert subset.layers == (0, 2)
    # same numbers as the full run at those layers; layer 2's predecessor was not captured
    assert subset.to_dict()["resid_pre"][1]["base_norm"] == full.to_dict()["resid_pre"][2]["base_norm"]
    assert subset.to_dict()["resid_pre"][1]["base_cosine_prev"] is None


def test_position_zero_is_reported_on_its_own(tiny_model_dirs):
    directory = str(tiny_model_dirs["llama"])
    excluded = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS).to_dict()
    included = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS,
                                    include_first_token=True).to_dict()
    n_real = sum(len(ids) for ids in excluded["provenance"]["token_ids"])
    assert excluded["aggregation"]["n_tokens"] == n_real - len(PROMPTS)
    assert included["aggregation"]["n_tokens"] == n_real
    first = excluded["first_token"]["resid_pre"][1]["base_norm"]
    rest = excluded["resid_pre"][1]["base_norm"]
    both = included["resid_pre"][1]["base_norm"]
    assert first != rest and both != rest
    assert min(first["min"], rest["min"]) == pytest.approx(both["min"])


def test_json_is_strict_and_dataframe_is_tidy(tiny_model_dirs):
    directory = str(tiny_model_dirs["mistral"])
    result = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS)
    text = json.dumps(result.to_dict(), allow_nan=False)
    document = json.loads(text)
    assert document["schema_version"] == SCHEMA_VERSION
    for key in ("versions", "pair", "base_model", "sft_model", "dtype", "device", "token_ids",
                "chat_template", "timestamp"):
        assert key in document["provenance"]
    frame = result.to_dataframe()
    n_tokens = int(result.real_tokens.sum())
    # Two residual hooks x 10 metrics and two sublayer outputs x 4 metrics at 3 layers, the logit lens's 5
    # (on resid_post) at the output only (the default), every real token.
    assert result.analysis_layers_of("logit_lens") == (2,)
    assert len(frame) == n_tokens * (3 * (2 * len(METRIC_NAMES) + 2 * len(COMPONENT_METRICS)) + len(LOGIT_LENS_KEYS))
    mlp = frame.query("hook == 'mlp_out' and layer == 2 and metric == 'cosine' and prompt == 1 and position == 1")
    assert mlp["value"].item() == result.analysis_metrics["mlp_out.cosine"][2, 1, 1].item()
    assert list(frame.columns) == ["prompt", "hook", "layer", "position", "token", "token_id",
                                   "base_untrained", "metric", "value"]
    row = frame.query("hook == 'resid_post' and layer == 2 and metric == 'base_norm' and prompt == 1 "
                      "and position == 1")
    expected = result.metrics["resid_post"]["base_norm"][2, 1, 1].item()
    assert math.isclose(row["value"].item(), expected, rel_tol=1e-6)
    summary = result.summary()
    layer_mean = summary.query("positions == 'rest' and hook == 'resid_pre' and layer == 1 "
                               "and metric == 'sft_norm'")["mean"].item()
    assert layer_mean == pytest.approx(
        frame.query("hook == 'resid_pre' and layer == 1 and metric == 'sft_norm' and position > 0")["value"].mean()
    )


def test_bfloat16_run_keeps_residuals_in_model_dtype(tiny_model_dirs):
    directory = str(tiny_model_dirs["qwen2"])
    result = lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS, dtype="bfloat16",
                                  keep_residuals=True)
    base, sft = result.residuals
    assert base.values.dtype == torch.bfloat16
    assert result.metrics["resid_pre"]["cosine"].dtype == torch.float32
    assert result.to_dict()["provenance"]["dtype"] == {"base": "bfloat16", "sft": "bfloat16"}


def test_models_of_different_depth_are_refused_before_loading(tiny_model_dirs, tmp_path):
    from tests.fixtures.tiny_models import build_tiny_model

    shallow = build_tiny_model("llama", tmp_path / "shallow", n_layers=2)
    with pytest.raises(lens_compare.ConfigError, match=r"differ in depth \(3 vs 2 layers\)"):
        lens_compare.compare(base=str(tiny_model_dirs["llama"]), sft=str(shallow), prompts=PROMPTS)


def test_verdict_names_the_layer_and_token_of_largest_drift(perturbed_llama):
    import lens_compare
    from lens_compare.results.verdict import verdict

    base, sft, block = perturbed_llama
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=["the quick brown fox jumps", "hello world"])
    text = verdict(result)
    summary = result.summary()
    rows = summary[(summary.positions == "rest") & (summary.hook == "resid_post") & (summary.metric == "relative_l2")]
    worst = int(rows.loc[rows["mean"].idxmax(), "layer"])
    assert worst >= block
    assert f"largest drift: layer {worst} (relative_l2 {rows['mean'].max():.4f}, 95% CI " in text
    values = result.metrics["resid_post"]["relative_l2"][list(result.layers).index(worst)]
    mask = result.real_tokens.clone()
    mask[:, 0] = False
    prompt, position = divmod(int(torch.argmax(torch.where(mask, values, -torch.inf))), values.shape[1])
    assert f"(prompt {prompt}, position {position})" in text
    for layer in (0, worst):
        assert any(line.split()[0] == str(layer) for line in text.splitlines()[2:-1])
    same = lens_compare.compare(base=str(base), sft=str(base), prompts=["hello world"])
    assert verdict(same).endswith("no drift: resid_post is identical in both models at every captured layer")


def test_verdict_reads_the_drift_against_a_noise_floor_run(perturbed_llama):
    import lens_compare
    from lens_compare.results.verdict import verdict

    base, sft, block = perturbed_llama
    prompts = ["the quick brown fox jumps", "hello world"]
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=prompts)
    same = lens_compare.compare(base=str(base), sft=str(base), prompts=prompts)
    lines = verdict(result, noise_floor=result).splitlines()
    assert lines[0].endswith("noise floor: custom:")
    assert lines[1].split() == ["layer", "cosine", "relative_l2", "floor", "rel_l2", "x", "floor"]
    rows = [line.split() for line in lines[2:] if line.split()[0].isdigit()]
    for row in rows:
        layer = int(row[0])
        if layer >= block:  # the floor is the run itself: ratio 1 wherever there is drift
            assert row[3] == row[2] and row[4] == "1.0"
        else:  # identical before the perturbed block: no ratio to a floor of 0
            assert float(row[2]) == 0.0 and row[4] == "-"
    floored = verdict(result, noise_floor=same).splitlines()
    assert all(line.split()[4] == "-" for line in floored[2:] if line.split()[0].isdigit())
