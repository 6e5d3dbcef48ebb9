"""Sublayer attribution (``components``): each block's attention and MLP writes, base vs SFT."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lens_compare
from lens_compare import RunConfig
from lens_compare.analyses.components import COMPONENT_KEYS, COMPONENT_METRICS
from lens_compare.capture.states import capture_states
from lens_compare.capture.streamed import stream_states
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.loading import load_config, resolve_ref
from lens_compare.pipeline.comparison import run_comparison
from lens_compare.run import main
from lens_compare.util.hooks import COMPONENTS, states_for_layers
from tests.fixtures.bridges import PROMPTS, load_bridge, padded_batch
from tests.fixtures.tiny_models import FAMILIES, perturb_block

FP32 = {"atol": 1e-5, "rtol": 1.3e-6}
STRATEGIES = ("resident", "sequential", "stream")


def _hf_writes(directory, ids, real):
    """Every block's attention and MLP outputs from a plain HF forward with forward hooks."""
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    blocks = model.model.layers if hasattr(model, "model") else model.transformer.h
    writes, handles = {}, []
    for index, block in enumerate(blocks):
        attention = block.self_attn if hasattr(block, "self_attn") else block.attn
        for part, module in (("attn_out", attention), ("mlp_out", block.mlp)):
            def keep(_m, _a, output, key=(index, part)):
                writes[key] = output[0] if isinstance(output, tuple) else output
            handles.append(module.register_forward_hook(keep))
    with torch.no_grad():
        model(ids, attention_mask=real.long())
    for handle in handles:
        handle.remove()
    return writes


@pytest.mark.parametrize("family", FAMILIES)
def test_sublayer_outputs_equal_hf_modules_and_add_up_to_the_block(family, tiny_model_dirs):
    directory = tiny_model_dirs[family]
    bridge, tokenizer = load_bridge(directory)
    ids, real = padded_batch(tokenizer)
    layers = tuple(range(bridge.cfg.n_layers))
    captured = capture_states(bridge, ids, real, states_for_layers(layers), batch_size=2, label=family,
                              component_layers=layers)
    reference = _hf_writes(directory, ids, real)
    for layer in layers:
        written = torch.zeros_like(captured.resid_pre(layer))
        for part in COMPONENTS:
            ours = captured.component(part, layer)
            torch.testing.assert_close(ours[real], reference[(layer, part)][real], **FP32)
            assert ours[real].abs().max() > 1e-3, "the hook fired and wrote something"
            assert torch.all(ours[~real] == 0), "padding is zeroed"
            written += ours
        # A sequential block: resid_post = resid_pre + attn_out + mlp_out.
        torch.testing.assert_close((captured.resid_pre(layer) + written)[real], captured.resid_post(layer)[real],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ("qwen2", "llama", "mistral", "nemotron", "deepseek_v3", "gpt2"))
def test_streamed_sublayer_outputs_equal_the_bridge(family, tiny_model_dirs):
    directory = tiny_model_dirs[family]
    bridge, tokenizer = load_bridge(directory)
    ids, real = padded_batch(tokenizer)
    layers = (0, 2)
    states = states_for_layers(layers)
    expected = capture_states(bridge, ids, real, states, batch_size=2, label=family, component_layers=layers)
    ref = resolve_ref(str(directory))
    streamed = stream_states("base", ref, load_config(ref), LoadOptions("float32", "cpu"), ids, real, states,
                             batch_size=2, component_layers=layers)
    assert streamed.component_layers == layers
    torch.testing.assert_close(streamed.components, expected.components, **FP32)


@pytest.fixture(scope="module")
def mlp_only_pair(tiny_model_dirs, tmp_path_factory):
    """A llama checkpoint and a copy differing only in block 1's MLP weights."""
    block = 1
    sft = perturb_block(tiny_model_dirs["llama"], tmp_path_factory.mktemp("mlp_only") / "llama", block, only="mlp.")
    return tiny_model_dirs["llama"], sft, block


def _config(base, sft, **extra):
    return RunConfig.from_dict({"base_model": str(base), "sft_model": str(sft), "prompts": PROMPTS,
                                "batch_size": 2, **extra})


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_changed_mlp_shows_in_mlp_out_only(mlp_only_pair, strategy):
    base, sft, block = mlp_only_pair
    result = run_comparison(_config(base, sft, strategy=strategy))
    real = result.real_tokens
    values = result.analysis_metrics
    assert set(COMPONENT_KEYS) <= set(values)
    for layer in range(block):  # every earlier block: both writes identical
        for part in COMPONENTS:
            assert torch.all(values[f"{part}.relative_l2"][layer][real] == 0)
            assert torch.all(values[f"{part}.cosine"][layer][real] == 1)
    # At the changed block its attention (which runs first, on an identical stream) is identical...
    assert torch.all(values["attn_out.relative_l2"][block][real] == 0)
    torch.testing.assert_close(values["attn_out.base_norm"][block], values["attn_out.sft_norm"][block],
                               equal_nan=True, atol=0, rtol=0)
    # ...and its MLP is not.
    assert torch.all(values["mlp_out.relative_l2"][block][real] > 1e-3)
    # Downstream both differ: the stream they read has changed.
    assert torch.all(values["attn_out.relative_l2"][block + 1][real] > 0)
    records = result.to_dict()["components"]
    assert [r["layer"] for r in records] == [0, 1, 2]
    assert set(records[block]) == {"layer", "attn_out", "mlp_out"}
    assert set(records[block]["mlp_out"]) == set(COMPONENT_METRICS)
    assert records[block]["attn_out"]["relative_l2"]["max"] == 0.0
    assert records[block]["mlp_out"]["relative_l2"]["mean"] > 1e-3


def test_aggregates_against_numpy_from_the_captured_writes(mlp_only_pair):
    base, sft, block = mlp_only_pair
    result = run_comparison(_config(base, sft, strategy="resident", bootstrap=0), keep_residuals=True)
    base_writes, sft_writes = (states.components.double().numpy() for states in result.residuals)
    keep = result.real_tokens.numpy().copy()
    keep[:, 0] = False  # position 0 is left out of the main aggregates, as for the residual metrics
    records = result.analysis_records("components")
    for row in range(len(result.layers)):
        for index, part in enumerate(COMPONENTS):
            b, s = base_writes[row, index][keep], sft_writes[row, index][keep]
            relative = np.linalg.norm(s - b, axis=-1) / np.linalg.norm(b, axis=-1)
            cosine = (b * s).sum(-1) / (np.linalg.norm(b, axis=-1) * np.linalg.norm(s, axis=-1))
            stats = records[row][part]
            assert stats["relative_l2"]["mean"] == pytest.approx(relative.mean(), rel=1e-5, abs=1e-7)
            assert stats["relative_l2"]["std"] == pytest.approx(relative.std(), rel=1e-4, abs=1e-6)
            assert stats["cosine"]["min"] == pytest.approx(min(cosine.min(), 1.0), rel=1e-6)
            assert stats["sft_norm"]["max"] == pytest.approx(np.linalg.norm(s, axis=-1).max(), rel=1e-6)
    first = result.analysis_records("components", "first")
    assert first[block]["attn_out"]["relative_l2"]["max"] == 0.0
    summary = result.summary(hook="mlp_out", metric="relative_l2", positions="rest")
    assert summary["mean"].tolist() == pytest.approx([r["mlp_out"]["relative_l2"]["mean"] for r in records])


def test_cli_json_components_round_trip_and_switch_off(mlp_only_pair, tmp_path, capsys):
    base, sft, block = mlp_only_pair
    args = ["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "-q"]
    assert main([*args, "--csv", "--out", str(tmp_path / "on")]) == 0
    path = next((tmp_path / "on").glob("*.json"))
    written = json.loads(path.read_text())
    assert written["components"][block]["layer"] == block and "components" in written["first_token"]
    loaded = lens_compare.load_run(path)  # per-token values back from the token table
    assert loaded.to_dict()["components"] == written["components"]
    for table in path.parent.glob("*.tokens.csv"):
        table.unlink()
    stored = lens_compare.load_run(path)  # the JSON's records only
    assert stored.analysis_records("components") == written["components"]
    assert len(stored.summary(hook="attn_out")) == len(loaded.summary(hook="attn_out")) > 0

    assert main([*args, "--no-components", "--out", str(tmp_path / "off")]) == 0
    plain = json.loads(next((tmp_path / "off").glob("*.json")).read_text())
    assert "components" not in plain and "components" not in plain["first_token"]
    assert plain["resid_post"] == written["resid_post"]
    with pytest.raises(lens_compare.LensCompareError, match="no 'components' analysis"):
        lens_compare.load_run(next((tmp_path / "off").glob("*.json"))).analysis_records("components")
    capsys.readouterr()
