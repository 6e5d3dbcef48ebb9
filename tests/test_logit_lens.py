"""Logit lens between the models: divergences against numpy, the last layer against the models'
actual output, every engine and chunking against each other, and when it runs."""

import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lens_compare
from lens_compare import RunConfig
from lens_compare.analyses.logit_lens import (
    LOGIT_LENS_KEYS,
    chunk_tokens,
    logit_lens_metrics,
    resolve_logit_lens,
    token_divergences,
)
from lens_compare.errors import ConfigError
from lens_compare.pipeline import run_comparison
from lens_compare.run import main
from tests.fixtures.tiny_models import FAMILIES

PROMPTS = ["the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding"]


def _numpy_reference(base_logits: np.ndarray, sft_logits: np.ndarray, base_final: np.ndarray,
                     sft_final: np.ndarray) -> dict[str, np.ndarray]:
    """Written from the definitions, in float64 probabilities (not log-probabilities)."""
    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def kl(p, q):
        return (p * np.log(p / q)).sum(axis=-1)

    pb, ps, fb, fs = (softmax(x.astype(np.float64)) for x in (base_logits, sft_logits, base_final, sft_final))
    m = (pb + ps) / 2
    return {"kl_sft_base": kl(ps, pb), "js": 0.5 * kl(ps, m) + 0.5 * kl(pb, m),
            "top1_agree": (pb.argmax(-1) == ps.argmax(-1)).astype(np.float64),
            "base_kl_to_final": kl(fb, pb), "sft_kl_to_final": kl(fs, ps)}


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_divergences_against_numpy(scale):
    generator = torch.Generator().manual_seed(0)
    logits = [scale * torch.randn(50, 300, generator=generator) for _ in range(4)]
    logits[1][:10] = logits[0][:10]  # identical rows: every cross divergence 0, top-1 agreeing
    ours = token_divergences(*(torch.log_softmax(x, dim=-1) for x in logits))
    reference = _numpy_reference(*(x.numpy() for x in logits))
    for key in LOGIT_LENS_KEYS:
        np.testing.assert_allclose(ours[key].numpy(), reference[key], rtol=1e-4, atol=1e-6)
    assert torch.all(ours["kl_sft_base"][:10] == 0) and torch.all(ours["top1_agree"][:10] == 1)
    assert 0 < ours["top1_agree"].mean() < 1
    assert torch.all(ours["js"] <= np.log(2) + 1e-6)


def test_chunking_and_state_order_do_not_change_the_numbers():
    generator = torch.Generator().manual_seed(1)
    d, vocab = 16, 97
    heads = {}
    for role in ("base", "sft"):
        norm = torch.nn.LayerNorm(d)
        heads[role] = lens_compare.analyses.logit_lens.Head(norm.eval(), torch.randn(vocab, d, generator=generator),
                                                            None)
    states = {role: {s: torch.randn(3, 7, d, generator=generator) for s in range(5)} for role in heads}
    real = torch.ones(3, 7, dtype=torch.bool)
    real[1, 4:] = False
    read = lambda role, state: states[role][state]  # noqa: E731
    whole = logit_lens_metrics(heads, read, (0, 2, 3), 4, real)
    assert chunk_tokens(vocab, budget=7 * vocab * 4) == 1
    chunked = [logit_lens_metrics(heads, read, (0, 2, 3), 4, real, budget=7 * vocab * 4 * 2,
                                  states_in_memory=in_memory) for in_memory in (True, False)]
    for key in LOGIT_LENS_KEYS:
        # The same chunks in either order: the same bits. Other chunk sizes: other matmul blocking.
        torch.testing.assert_close(chunked[0][key], chunked[1][key], equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(chunked[0][key], whole[key], equal_nan=True, atol=1e-5, rtol=1e-5)
    assert torch.isnan(whole["js"][:, 1, 4:]).all() and not torch.isnan(whole["js"][:, 1, :4]).any()
    assert torch.all(whole["base_kl_to_final"][2][real] == 0)  # layer 3's resid_post is the final state


def _actual_kl(base, sft, ids):
    """KL(p_sft || p_base) of the two models' own outputs, in float64, prompt by prompt (no padding)."""
    out = []
    for row in ids:
        t = torch.tensor([row])
        with torch.no_grad():
            lb = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")(t).logits[0].double()
            ls = AutoModelForCausalLM.from_pretrained(sft, attn_implementation="eager")(t).logits[0].double()
        lb, ls = lb.log_softmax(-1), ls.log_softmax(-1)
        out.append((ls.exp() * (ls - lb)).sum(-1))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_kl_is_the_kl_of_the_actual_outputs(family, tiny_model_dirs, tmp_path):
    from tests.fixtures.tiny_models import perturb_block

    base = tiny_model_dirs[family]
    sft = perturb_block(base, tmp_path / family, 1)
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, bootstrap=0)
    assert result.provenance["config"]["logit_lens"] is None  # on by default: a tiny model
    lens = result.analysis_metrics
    for row, expected in enumerate(_actual_kl(base, sft, result.tokens.token_ids)):
        ours = lens["kl_sft_base"][-1, row, : len(expected)]
        torch.testing.assert_close(ours, expected.float(), atol=2e-6, rtol=1e-4)
    assert torch.all(lens["base_kl_to_final"][-1][result.real_tokens] == 0)
    # Block 0 is identical in both models: its stream predicts the same in both.
    assert torch.all(lens["kl_sft_base"][0][result.real_tokens] == 0)
    assert torch.all(lens["top1_agree"][0][result.real_tokens] == 1)
    assert torch.all(lens["kl_sft_base"][1][result.real_tokens] > 0)


@pytest.mark.parametrize("extra", [{"strategy": "sequential"}, {"strategy": "stream"},
                                   {"strategy": "resident", "shard_size": 1}, {"strategy": "stream", "shard_size": 2},
                                   {"strategy": "resident", "layers": [0, 2]}])
def test_every_engine_and_sharding_gives_the_resident_numbers(perturbed_llama, extra):
    base, sft, _ = perturbed_llama
    config = RunConfig.from_dict({"base_model": str(base), "sft_model": str(sft), "prompts": PROMPTS,
                                  "batch_size": 2, "bootstrap": 0})
    reference = run_comparison(config.replace(strategy="resident"))
    other = run_comparison(config.replace(**extra))
    rows = [reference.layers.index(layer) for layer in other.layers]
    for key in LOGIT_LENS_KEYS:
        torch.testing.assert_close(other.analysis_metrics[key], reference.analysis_metrics[key][rows],
                                   equal_nan=True, atol=1e-5, rtol=1e-5)


def test_when_the_lens_runs(tiny_model_dirs, caplog):
    configs = {"base": AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).config}
    configs["sft"] = configs["base"]
    assert resolve_logit_lens(None, configs) and resolve_logit_lens(True, configs)
    assert not resolve_logit_lens(False, configs)
    big = LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8)
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        assert not resolve_logit_lens(None, {"base": big, "sft": big})
    assert "above 8B parameters (this pair: 70.6B); --logit-lens turns it on" in caplog.text
    assert resolve_logit_lens(True, {"base": big, "sft": big})
    capped = LlamaConfig.from_dict({**configs["base"].to_dict(), "final_logit_softcapping": 30.0})
    assert not resolve_logit_lens(None, {"base": capped, "sft": capped})
    with pytest.raises(ConfigError, match="final_logit_softcapping = 30.0 transforms the logits"):
        resolve_logit_lens(True, {"base": capped, "sft": capped})
    odd = LlamaConfig.from_dict(configs["base"].to_dict())
    odd.model_type = "olmo2"
    with pytest.raises(ConfigError, match="has no known final norm.*--no-logit-lens"):
        resolve_logit_lens(True, {"base": odd, "sft": odd})


def test_cli_json_round_trip_and_switch_off(perturbed_llama, tmp_path, capsys):
    base, sft, block = perturbed_llama
    args = ["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "-q"]
    assert main([*args, "--csv", "--out", str(tmp_path / "on")]) == 0
    path = next((tmp_path / "on").glob("*.json"))
    written = json.loads(path.read_text())
    records = written["logit_lens"]
    assert [r["layer"] for r in records] == [0, 1, 2] and set(records[0]) == {"layer", *LOGIT_LENS_KEYS}
    assert records[0]["kl_sft_base"]["max"] == 0.0 and records[block]["kl_sft_base"]["mean"] > 0
    assert records[-1]["base_kl_to_final"]["max"] == 0.0
    assert "logit_lens" in written["first_token"]
    assert lens_compare.load_run(path).to_dict()["logit_lens"] == records
    summary = lens_compare.load_run(path).summary(hook="resid_post", metric="top1_agree")
    assert summary.query("positions == 'rest'")["mean"].tolist()[0] == 1.0
    assert main([*args, "--no-logit-lens", "--out", str(tmp_path / "off")]) == 0
    plain = json.loads(next((tmp_path / "off").glob("*.json")).read_text())
    assert "logit_lens" not in plain and plain["resid_post"] == written["resid_post"]
    capsys.readouterr()
