"""Logit lens between the models: divergences against numpy, the last layer against the models'
actual output, every engine and chunking against each other, and when it runs."""

import json
import logging

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import lens_compare
from lens_compare import RunConfig
from lens_compare.analyses.lens_choice import choose_logit_lens
from lens_compare.analyses.logit_lens import (
    FINAL_TENSORS,
    LOGIT_LENS_KEYS,
    SLICE_TENSORS,
    Distributions,
    chunk_tokens,
    logit_lens_metrics,
    token_divergences,
)
from lens_compare.config import parse_lens_spec
from lens_compare.errors import ConfigError
from lens_compare.pipeline.comparison import run_comparison
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
    ours = token_divergences(*(Distributions.of(x.clone(), with_entropy=i >= 2) for i, x in enumerate(logits)))
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
        heads[role] = lens_compare.capture.head.Head(norm.eval(), torch.randn(vocab, d, generator=generator),
                                                            None)
    states = {role: {s: torch.randn(3, 7, d, generator=generator) for s in range(5)} for role in heads}
    real = torch.ones(3, 7, dtype=torch.bool)
    real[1, 4:] = False
    read = lambda role, state: states[role][state]  # noqa: E731
    whole = logit_lens_metrics(heads, read, (0, 2, 3), 4, real)
    small = 2 * vocab * 4 * (FINAL_TENSORS + 2 + SLICE_TENSORS)  # two tokens' tensors
    assert chunk_tokens(vocab, budget=small) == 2
    chunked = [logit_lens_metrics(heads, read, (0, 2, 3), 4, real, budget=small, states_in_memory=in_memory)
               for in_memory in (True, False)]
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
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, bootstrap=0, logit_lens="all")
    assert result.provenance["logit_lens"]["mode"] == "all"
    lens = result.analysis_metrics
    for row, expected in enumerate(_actual_kl(base, sft, result.tokens.token_ids)):
        ours = lens["kl_sft_base"][-1, row, : len(expected)]
        torch.testing.assert_close(ours, expected.float(), atol=2e-6, rtol=1e-4)
    assert torch.all(lens["base_kl_to_final"][-1][result.real_tokens] == 0)
    # Block 0 is identical in both models: its stream predicts the same in both.
    assert torch.all(lens["kl_sft_base"][0][result.real_tokens] == 0)
    assert torch.all(lens["top1_agree"][0][result.real_tokens] == 1)
    assert torch.all(lens["kl_sft_base"][1][result.real_tokens] > 0)
    # The default lens (auto: the output only, on a tiny model too) gives the last layer's numbers.
    final = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, bootstrap=0)
    assert final.provenance["logit_lens"]["mode"] == "final"
    assert final.analysis_layers_of("logit_lens") == (result.layers[-1],)
    for key in LOGIT_LENS_KEYS:
        torch.testing.assert_close(final.analysis_metrics[key], lens[key][-1:], equal_nan=True, atol=1e-6,
                                   rtol=1e-5)


@pytest.mark.parametrize("extra", [{"strategy": "sequential"}, {"strategy": "stream"},
                                   {"strategy": "resident", "shard_size": 1}, {"strategy": "stream", "shard_size": 2},
                                   {"strategy": "resident", "layers": [0, 2]},
                                   {"strategy": "stream", "logit_lens": "0,last"}])
def test_every_engine_and_sharding_gives_the_resident_numbers(perturbed_llama, extra):
    base, sft, _ = perturbed_llama
    config = RunConfig.from_dict({"base_model": str(base), "sft_model": str(sft), "prompts": PROMPTS,
                                  "batch_size": 2, "bootstrap": 0, "logit_lens": "all"})
    reference = run_comparison(config.replace(strategy="resident"))
    other = run_comparison(config.replace(**extra))
    rows = [reference.analysis_layers_of("logit_lens").index(layer) for layer in other.analysis_layers_of("logit_lens")]
    assert rows == [reference.layers.index(layer) for layer in other.layers] or "logit_lens" in extra
    for key in LOGIT_LENS_KEYS:
        torch.testing.assert_close(other.analysis_metrics[key], reference.analysis_metrics[key][rows],
                                   equal_nan=True, atol=1e-5, rtol=1e-5)


def test_the_option_and_when_the_lens_runs(tiny_model_dirs, caplog):
    """auto weighs the planner's estimates; the explicit modes, layer lists and what cannot run."""
    assert [parse_lens_spec(v) for v in (None, True, False, "ALL", [0, "last"], " 3, 1 ")] == \
        ["auto", "all", "off", "all", "0,last", "3,1"]
    for bad in ("everything", "0,x", 3.5):
        with pytest.raises(ConfigError, match="auto, all, final, off"):
            parse_lens_spec(bad)
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).config
    configs = {"base": config, "sft": config}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    tokenizers = {"base": tokenizer, "sft": tokenizer}
    captured = (0, 1, 2)

    def choose(spec, estimate=None, **kw):
        return choose_logit_lens(spec, kw.get("configs", configs), tokenizers, captured,
                                 estimate=(lambda: estimate) if estimate else None)

    cheap = {"forwards": 10.0, "lens_all": 2.0, "lens_final": 0.5}
    dear = {"forwards": 10.0, "lens_all": 60.0, "lens_final": 2.0}
    assert (choose("auto", cheap).mode, choose("auto", cheap).layers) == ("all", captured)
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        auto = choose("auto", dear)
    assert (auto.mode, auto.layers) == ("final", (2,)) and "--logit-lens all would add ~58.0 s" in auto.reason
    assert auto.estimate == dear and choose("auto").mode == "final"  # no estimate: the output only
    assert choose("all").layers == captured and choose("final").layers == (2,) and not choose("off").on
    assert choose("0,last").layers == (0, 2) and choose("2").mode == "final"
    with pytest.raises(ConfigError, match="layer 7 does not exist: the models have 3 layers"):
        choose("0,7")
    capped = LlamaConfig.from_dict({**config.to_dict(), "final_logit_softcapping": 30.0})
    assert not choose("auto", configs={"base": capped, "sft": capped}).on
    with pytest.raises(ConfigError, match="final_logit_softcapping = 30.0 transforms the logits"):
        choose("final", configs={"base": capped, "sft": capped})
    odd = LlamaConfig.from_dict(config.to_dict())
    odd.model_type = "olmo2"
    with pytest.raises(ConfigError, match="has no known final norm.*--no-logit-lens"):
        choose("all", configs={"base": odd, "sft": odd})


def test_auto_weighs_the_planners_estimates_of_real_models():
    """For real models the lens at every layer costs more than the forwards themselves: auto gives the
    output only, and says what every layer would add."""
    from lens_compare.hardware.machine import Machine, catalog_machine
    from lens_compare.hardware.planner import lens_time_estimate
    from lens_compare.hardware.sources import model_configs

    llama = AutoConfig.for_model(**model_configs()["meta-llama/Llama-3.1-8B"])
    for machine in (Machine("cpu", 1, 64.0, 64.0), catalog_machine("H100 SXM 80GB", 1)):
        estimate = lens_time_estimate({"base": llama, "sft": llama}, {"base": "bfloat16", "sft": "bfloat16"},
                                      machine, tokens=250, prompts=64, forward_batch=8, layers=32)
        # Two heads of 2 x 128256 x 4096 FLOPs at 32 layers and the output, over LENS_EFFICIENCY, per token:
        # 87 GFLOP against 2 x 2 x 8.03e9 = 32 GFLOP for both forwards: ~2.7x.
        assert 2.0 < estimate["lens_all"] / estimate["forwards"] < 4.0, estimate
        assert estimate["lens_final"] < estimate["lens_all"] / 10


def test_cli_json_round_trip_partial_lens_and_switch_off(perturbed_llama, tmp_path, capsys):
    base, sft, block = perturbed_llama
    args = ["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2], "-q"]
    assert main([*args, "--csv", "--logit-lens", "--out", str(tmp_path / "on")]) == 0
    path = next((tmp_path / "on").glob("*.json"))
    written = json.loads(path.read_text())
    records = written["logit_lens"]
    assert written["provenance"]["logit_lens"]["layers"] == [0, 1, 2] and written["provenance"]["logit_lens"]["mode"] \
        == "all"
    assert [r["layer"] for r in records] == [0, 1, 2] and set(records[0]) == {"layer", *LOGIT_LENS_KEYS}
    assert records[0]["kl_sft_base"]["max"] == 0.0 and records[block]["kl_sft_base"]["mean"] > 0
    assert records[-1]["base_kl_to_final"]["max"] == 0.0
    assert "logit_lens" in written["first_token"]
    assert lens_compare.load_run(path).to_dict()["logit_lens"] == records
    summary = lens_compare.load_run(path).summary(hook="resid_post", metric="top1_agree")
    assert summary.query("positions == 'rest'")["mean"].tolist()[0] == 1.0
    # A schema 3 run (before the lens's layers were chosen: every layer, and no provenance.logit_lens) loads.
    old = json.loads(path.read_text())
    old["schema_version"] = 3
    del old["provenance"]["logit_lens"], old["provenance"]["plan"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert lens_compare.load_run(tmp_path / "old.json").summary(metric="js")["layer"].tolist() == [0, 1, 2] * 2
    # The default: the output only; the JSON, summary, token table, plots and load_run follow its one layer.
    assert main([*args, "--csv", "--out", str(tmp_path / "default")]) == 0
    path = next((tmp_path / "default").glob("*.json"))
    partial = json.loads(path.read_text())
    assert partial["provenance"]["logit_lens"]["mode"] == "final" and [r["layer"] for r in partial["logit_lens"]] == [2]
    assert partial["logit_lens"][0]["kl_sft_base"] == records[-1]["kl_sft_base"]
    loaded = lens_compare.load_run(path)
    assert loaded.to_dict()["logit_lens"] == partial["logit_lens"]
    table = loaded.to_dataframe().query("metric == 'kl_sft_base'")
    assert set(table["layer"]) == {2} and len(table) == int(loaded.real_tokens.sum())
    assert loaded.summary(metric="kl_sft_base", positions="rest")["layer"].tolist() == [2]
    from lens_compare import plots
    from lens_compare.results.verdict import verdict

    assert plots.logit_lens_curves(loaded).axes and "logit_lens" in plots.standard_figures(loaded)
    assert "next-token distributions (the models' outputs" in verdict(loaded)
    assert main([*args, "--no-logit-lens", "--out", str(tmp_path / "off")]) == 0
    plain = json.loads(next((tmp_path / "off").glob("*.json")).read_text())
    assert "logit_lens" not in plain and plain["resid_post"] == written["resid_post"]
    assert plain["provenance"]["logit_lens"]["mode"] == "off"
    capsys.readouterr()


def test_a_streamed_run_reads_the_heads_first_and_keeps_two_states_at_the_output(perturbed_llama, monkeypatch):
    """The stream reads both heads before its first block; with the lens at the output only it holds two
    states per model at any time, and with it at every layer the lensed states until the last block."""
    from lens_compare.capture import streamed as streaming
    from lens_compare.engines.store import Kind, MemoryStore

    base, sft, _ = perturbed_llama
    reads, held = [], {"final": 0, "all": 0}
    original_head, original_load = streaming.StreamedModel.read_head, streaming.StreamedModel.load
    monkeypatch.setattr(streaming.StreamedModel, "read_head",
                        lambda self: (reads.append("head"), original_head(self))[1])
    monkeypatch.setattr(streaming.StreamedModel, "load", lambda self, path: (reads.append(path), original_load(self,
                                                                                                             path))[1])
    mode = {"now": "final"}
    put = MemoryStore.put

    def counting(self, kind, value, **parts):
        put(self, kind, value, **parts)
        if kind is Kind.STATE:
            now = len(self.keys(kind, role=parts["role"], shard=parts["shard"]))
            held[mode["now"]] = max(held[mode["now"]], now)

    monkeypatch.setattr(MemoryStore, "put", counting)
    for lens in ("final", "all"):
        mode["now"] = lens
        reads.clear()
        run_comparison(RunConfig.from_dict({"base_model": str(base), "sft_model": str(sft), "prompts": PROMPTS,
                                            "strategy": "stream", "logit_lens": lens, "bootstrap": 0}))
        first_block = next(i for i, path in enumerate(reads) if str(path).split(".")[-1].isdigit())
        assert reads.count("head") == 2 and reads.index("head") < first_block and reads[1:first_block].count("head")
    # All: states 1 and 2 (layers 0 and 1) kept until the last, 3, arrives; the output only: two at a time.
    assert held["final"] == 2 and held["all"] == 3


@pytest.mark.slow
def test_vocabularies_of_different_sizes_compare_their_shared_ids(smollm2_safetensors, smollm2_with_chat_tokens,
                                                                  caplog):
    """Real weights: the SFT side has 49,155 ids, the base 49,152. The residual metrics run as for any
    pair; the lens compares the 49,152 shared ids, each distribution renormalised over them, so the
    same weights give exactly 0 there (the full distributions would not: 3 more tokens share the mass)."""
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        result = lens_compare.compare(base=str(smollm2_safetensors), sft=str(smollm2_with_chat_tokens),
                                      prompts=["The capital of France is Paris.", "def add(a, b):"], bootstrap=0)
    vocabulary = result.provenance["logit_lens"]["vocabulary"]
    assert vocabulary["shared"] == 49152 and vocabulary["sizes"] == {"base": 49152, "sft": 49155}
    assert "compares the 49,152 token ids both models have (the sft model has 3 more)" in caplog.text
    assert all(r["cosine"]["min"] == 1.0 for r in result.to_dict()["resid_post"])
    lens = result.analysis_metrics
    assert torch.all(lens["kl_sft_base"][result.real_tokens.expand_as(lens["kl_sft_base"])] == 0)
    assert torch.all(lens["top1_agree"][result.real_tokens.expand_as(lens["top1_agree"])] == 1)


def test_shared_ids_that_name_different_tokens_refuse_the_lens_before_loading(tiny_model_dirs, tmp_path,
                                                                              monkeypatch):
    """Two tokenizers whose ids agree on every prompt but name different tokens elsewhere: the residual
    metrics can run (--no-logit-lens), the lens cannot; it is refused in one line, before loading."""
    import shutil

    from lens_compare.engines import loaded as model_loading

    other = tmp_path / "renamed"
    shutil.copytree(tiny_model_dirs["llama"], other)
    # The SFT tokenizer names the id of <|system|> (which no prompt here uses) <|tool|>.
    text = (other / "tokenizer.json").read_text()
    index = json.loads(text)["model"]["vocab"]["<|system|>"]
    (other / "tokenizer.json").write_text(text.replace("<|system|>", "<|tool|>"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (other / name).is_file():
            (other / name).write_text((other / name).read_text().replace("<|system|>", "<|tool|>"))
    monkeypatch.setattr(model_loading, "load_hf_model", lambda *a, **k: pytest.fail("a model was loaded"))
    names = rf"id {index} is '<\|system\|>' in the base tokenizer and '<\|tool\|>' in the"
    with pytest.raises(ConfigError, match=names):
        lens_compare.compare(base=str(tiny_model_dirs["llama"]), sft=str(other), prompts=["hello world"])
    monkeypatch.undo()
    result = lens_compare.compare(base=str(tiny_model_dirs["llama"]), sft=str(other), prompts=["hello world"],
                                  logit_lens=False)
    assert result.to_dict()["resid_post"][0]["cosine"]["mean"] == 1.0
