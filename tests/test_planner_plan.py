"""Weights per precision, run terms, strategy choice, GPU names, bad input, CLI output."""

import json
import math
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from lens_compare.errors import ConfigError, HardwareError, PairError
from lens_compare.hardware import (
    Machine,
    Workload,
    architecture_from_config,
    catalog_machine,
    plan_for_machine,
    plan_models,
    plan_pair,
    resolve_gpu,
    weight_bytes,
)
from lens_compare.hardware.run_memory import model_run_terms
from lens_compare.hardware.sources import ModelSource, checkpoint_of, model_configs
from lens_compare.models.params import TensorGroup, model_groups
from lens_compare.plan import main

QWEN7B = model_configs()["Qwen/Qwen2.5-7B"]


def test_dense_precisions_scale_with_width():
    groups = model_groups(architecture_from_config(QWEN7B))
    n = sum(g.numel for g in groups)
    assert weight_bytes(groups, "float32").total == 4 * n
    assert weight_bytes(groups, "bfloat16").total == weight_bytes(groups, "float16").total == 2 * n


def test_nf4_constants_with_and_without_double_quant():
    g = [TensorGroup("w", "linear", (4096, 4096), copies=2)]
    blocks = 4096 * 4096 // 64
    assert weight_bytes(g, "nf4").total == 2 * (4096 * 4096 // 2 + 4 * blocks)
    dq = 2 * (4096 * 4096 // 2 + blocks + 4 * math.ceil(blocks / 256))
    assert weight_bytes(g, "nf4", nf4_double_quant=True).total == dq
    # Embeddings, norms, biases and experts stay 16-bit.
    others = [TensorGroup("e", "embedding", (10, 8)), TensorGroup("x", "experts", (2, 4, 8))]
    assert weight_bytes(others, "nf4").total == 2 * (80 + 64)


def test_fp8_block_and_row_scales():
    g = [TensorGroup("w", "linear", (300, 200))]
    assert weight_bytes(g, "fp8", fp8_block=(128, 128)).total == 300 * 200 + 3 * 2 * 4
    assert weight_bytes(g, "fp8", fp8_block=None).total == 300 * 200 + 300 * 4
    assert weight_bytes([TensorGroup("n", "norm", (7,))], "fp8").total == 14


def test_unknown_precision():
    with pytest.raises(ConfigError, match="unknown precision 'int3'"):
        weight_bytes([], "int3")


def test_run_terms_formulas():
    arch = architecture_from_config(QWEN7B)
    t = model_run_terms(arch, "bfloat16", Workload(tokens=100, batch=2), params=1)
    gib = 2**30
    assert t.residuals == pytest.approx(29 * 200 * 3584 * 2 / gib)
    assert t.metrics_upcast == pytest.approx((3 * 200 * 3584 * 4 + 30 * 29 * 200 * 4) / 2 / gib)
    assert t.logits == pytest.approx(2 * 152064 * (2 + 4) / gib)  # last position only
    assert t.attention_scores == pytest.approx(2 * 28 * 100**2 * 8 / gib)
    chunked = model_run_terms(arch, "bfloat16", Workload(tokens=100, batch=2, forward_batch=1), params=1)
    assert chunked.residuals == t.residuals
    assert chunked.logits == pytest.approx(t.logits / 2)
    assert chunked.attention_scores == pytest.approx(t.attention_scores / 2)
    fewer = model_run_terms(arch, "bfloat16", Workload(tokens=100, batch=2, states=10), params=1)
    assert fewer.residuals == pytest.approx(t.residuals * 10 / 29)


def test_qwen7b_resident_on_one_80gb_card():
    plan = plan_pair("qwen7b", tokens=250, gpu="A100 80GB")
    assert plan.strategy == "resident"
    r = plan.strategies["resident"]
    assert r.min_gpus == 1 and r.fits and 0 < r.headroom_gib < 80


def test_qwen72b_resident_split_over_four_h100():
    plan = plan_pair("qwen72b", tokens=100, gpu="h100", count=4)
    assert plan.strategy == "resident"
    assert plan.strategies["resident"].min_gpus == 4
    assert not plan_pair("qwen72b", tokens=100, gpu="h100", count=3).strategies["resident"].fits


def test_llama405b_is_beyond_one_machine_in_bf16():
    plan = plan_pair("llama405b", tokens=250, gpu="h100", count=8)
    assert plan.strategies["resident"].min_gpus is None
    weights = 2 * plan.base.weights["bfloat16"].gib
    assert plan.beyond_one_machine["bfloat16"] >= math.ceil(weights / 79.65)
    assert plan.beyond_one_machine["bfloat16"] > 8
    assert "beyond one machine" in plan.explain()


def test_deepseek_defaults_to_fp8_where_supported():
    on_h100 = plan_pair("deepseek-v3", tokens=10, gpu="h100", count=8, with_cheapest=False)
    on_a100 = plan_pair("deepseek-v3", tokens=10, gpu="a100", count=8, with_cheapest=False)
    assert on_h100.base.precision == "fp8" and on_a100.base.precision == "bfloat16"
    assert any("dequantized" in n for n in on_a100.notes)
    assert on_h100.strategies["resident"].fits is False


def test_strategy_order_prefers_resident_then_sequential():
    plan = plan_pair("llama8b", tokens=250, gpu="RTX 4090", with_cheapest=False)
    assert not plan.strategies["resident"].fits
    assert plan.strategy == "sequential"
    assert any("noise floor" in n for n in plan.notes)


def test_cpu_machine_plan_and_refusal():
    small = Machine("cpu", 1, 64.0, 64.0)
    plan = plan_for_machine("qwen0.5b", tokens=50, machine=small)
    assert plan.strategy == "resident" and plan.strategies["stream"].fits
    # bitsandbytes runs NF4 on the CPU as well, and 4-bit weights make a 7B pair fit 12 GiB,
    # but auto never picks nf4: one block at a time fits as well, with the numbers unchanged.
    on_12 = plan_for_machine("qwen7b", tokens=50, machine=Machine("cpu", 1, 12.0, 12.0))
    assert on_12.strategies["nf4"].fits and on_12.strategy == "stream"
    # On the CPU the streamed run's host memory shares the one memory with the blocks.
    assert on_12.strategies["stream"].host_gib == 0.0
    with pytest.raises(HardwareError, match="refusing to load: nothing fits"):
        plan_for_machine("qwen72b", tokens=50, machine=Machine("cpu", 1, 2.0, 2.0))


def test_plan_for_machine_accepts_loaded_configs():
    plan = plan_for_machine(base="a", sft="b", base_config=QWEN7B, sft_config=QWEN7B, tokens=10,
                            machine=catalog_machine("a100", 1))
    assert plan.base.params.total == 7_615_616_512


@pytest.mark.parametrize(
    "alias,key",
    [("h100", "H100 SXM 80GB"), ("4090", "RTX 4090"), ("a100-40gb", "A100 40GB"),
     ("RTX 6000 ADA", "RTX 6000 Ada"), ("nvidia geforce rtx 3090", "RTX 3090"), ("t4", "T4")],
)
def test_gpu_aliases(alias, key):
    assert resolve_gpu(alias).name == key


def test_device_name_matching():
    from lens_compare.hardware.gpus import match_device_name

    assert match_device_name("NVIDIA A100-SXM4-40GB", 39.4).name == "A100 40GB"
    assert match_device_name("NVIDIA A100-SXM4-80GB", 79.1).name == "A100 80GB"
    assert match_device_name("NVIDIA H100 PCIe", 79.6).name == "H100 PCIe 80GB"
    assert match_device_name("NVIDIA GeForce RTX 4090", 23.99).name == "RTX 4090"
    assert match_device_name("Some Future GPU", 10.0) is None


def test_bad_input():
    with pytest.raises(ConfigError, match="Did you mean 'H100"):
        resolve_gpu("h1000")
    with pytest.raises(PairError, match="Did you mean"):
        plan_pair("qwen7")
    for count in (0, -2):
        with pytest.raises(ConfigError, match="impossible"):
            catalog_machine("h100", count)
    with pytest.raises(ConfigError, match="tokens=0"):
        Workload(tokens=0)
    with pytest.raises(ConfigError, match="missing hidden_size"):
        architecture_from_config({k: v for k, v in QWEN7B.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match="no 'model_type'"):
        architecture_from_config({"hidden_size": 4})
    with pytest.raises(ConfigError, match="Did you mean 'llama'"):
        architecture_from_config({"model_type": "lama"})


def test_cli_json_keys(capsys):
    # Only stream fits DeepSeek-V3 on 8x H100 (nf4 does not either: its experts stay 16-bit).
    assert main(["--pair", "deepseek-v3", "--tokens", "50", "--gpu", "h100", "--count", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["strategy"] == "stream" and out["strategies"]["stream"]["min_gpus"] == 1
    assert any("reads each checkpoint once" in note for note in out["notes"])
    for key in ("pair", "base_params", "sft_params", "base_active_params", "weights_gib", "run_gib",
                "strategies", "strategy", "gpus", "notes"):
        assert key in out
    assert set(out["strategies"]) == {"resident", "sequential", "nf4", "stream"}
    for entry in out["strategies"].values():
        for key in ("fits", "min_gpus", "peak_gib_per_gpu", "headroom_gib", "est_seconds", "est_cost_usd"):
            assert key in entry
    assert out["gpus"]["type"] == "H100 SXM 80GB" and out["gpus"]["count"] == 8
    assert out["steering"]["on"] is False and out["steering"]["reason"].startswith("stream:")


def test_cli_says_whether_the_steering_check_would_run_and_what_it_adds(capsys):
    assert main(["--pair", "qwen7b", "--n-prompts", "16"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("steering check: on (the check takes ~") and "; the run with it ~" in last
    assert main(["--pair", "qwen7b", "--n-prompts", "16", "--no-steer"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "steering check: off (--no-steer)"
    assert main(["--pair", "qwen7b", "--n-prompts", "16", "--steer-layers", "3", "--steer-alphas", "1", "--json"]) == 0
    steering = json.loads(capsys.readouterr().out)["steering"]
    assert steering["requested"] is None and steering["layers"] == [3] and steering["alphas"] == [1.0]
    assert steering["estimate"]["steering"] < steering["estimate"]["run"]


def test_cli_bad_input_exit_code(capsys):
    assert main(["--pair", "qwen7b", "--gpu", "h1000"]) == 1
    assert "Did you mean" in capsys.readouterr().err
    assert main(["--pair", "qwen7b", "--count", "0"]) == 1


def test_cli_local_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(QWEN7B))
    assert main(["--model-config", str(path), "--gpu", "a100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["base_params"] == 7_615_616_512


@pytest.mark.slow  # ~1,200 plans: 5 s plain, ~55 s under the beartype hook
def test_table_renders_18_by_4(capsys):
    assert main(["--table"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ")]
    rows = lines[2:]
    assert len(rows) == 18
    assert all(row.count("seed:") == 4 for row in rows)
    assert all(any(v in row for v in ("fits", "does not fit")) for row in rows)
    # docs/planner.md commits this table: it must be what the planner renders today.
    page = (Path(__file__).resolve().parents[1] / "docs" / "planner.md").read_text()
    stale = [row.split(" |")[0] for row in lines if row not in page]
    assert not stale, f"docs/planner.md's seed table is stale for {stale}: paste `python -m lens_compare.plan --table`"


def test_nf4_keeps_unquantized_tensors_in_the_load_dtype_and_router_float32():
    g = [TensorGroup("w", "linear", (128, 256)), TensorGroup("e", "embedding", (10, 8))]
    linear = 128 * 256 // 2 + (128 * 256 // 64) * 4
    assert weight_bytes(g, "nf4").total == linear + 80 * 2
    assert weight_bytes(g, "nf4", nf4_unquantized_bytes=4).total == linear + 80 * 4
    router = [TensorGroup("gate.weight", "router", (256, 7168))]
    assert {weight_bytes(router, p).total for p in ("bfloat16", "fp8", "nf4", "float32")} == {256 * 7168 * 4}


def test_time_estimate_covers_every_prompt_and_the_cpu_load_work():
    from lens_compare.hardware.estimate import Checkpoint
    from lens_compare.hardware.sources import ModelSource

    cpu = Machine("cpu", 1, 64.0, 64.0)
    source = ModelSource("q", QWEN7B, Checkpoint("bfloat16"))
    one = plan_models(source, source, Workload(tokens=100, batch=1), cpu, with_cheapest=False)
    many = plan_models(source, source, Workload(tokens=100, batch=1, prompts=50), cpu, with_cheapest=False)
    forward = (many.strategies["resident"].est_seconds - one.strategies["resident"].est_seconds) / 49
    assert forward == pytest.approx(2 * 2 * 7_615_616_512 * 100 / 100e9, rel=0.01)
    # NF4 on the CPU: quantizing the first time costs far more than reading the cached copy
    cached = ModelSource("q", QWEN7B, Checkpoint("bfloat16", nf4_cached=True))
    fresh = one.strategies["nf4"].est_seconds
    again = plan_models(cached, cached, Workload(tokens=100, batch=1), cpu, with_cheapest=False).strategies["nf4"]
    assert fresh > again.est_seconds + 100


def test_nf4_from_a_gguf_holds_the_dequantized_model_while_quantizing():
    from lens_compare.hardware.estimate import Checkpoint
    from lens_compare.hardware.sources import ModelSource

    gguf = ModelSource("g", QWEN7B, Checkpoint("gguf", gguf_file_bytes=4 * 2**30))
    cpu = Machine("cpu", 1, 1e4, 1e4)
    plan = plan_models(gguf, gguf, Workload(tokens=10, base_dtype="float32", sft_dtype="float32"), cpu,
                       with_cheapest=False)
    terms = plan.base.terms
    assert terms.nf4_load_transient == pytest.approx(terms.load_transient + 7_615_616_512 * 4 / 2**30)
    cached = ModelSource("g", QWEN7B, Checkpoint("gguf", gguf_file_bytes=4 * 2**30, nf4_cached=True))
    assert plan_models(cached, cached, plan.workload, cpu, with_cheapest=False).base.terms.nf4_load_transient == 0


# --- stream: layer-major, one block of each model at a time on one GPU ------------------

DEEPSEEK = model_configs()["deepseek-ai/DeepSeek-V3-Base"]


def _deepseek_moe_block_bf16_bytes(c) -> int:
    """One MoE decoder block of DeepSeek-V3 in bf16, from the config's numbers (MLA attention,
    256 routed + 1 shared expert, float32 router), written out by hand."""
    d, heads = c["hidden_size"], c["num_attention_heads"]
    qk_head = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    q, kv = c["q_lora_rank"], c["kv_lora_rank"]
    attention = (q * d + q + heads * qk_head * q  # q_a_proj, q_a_layernorm, q_b_proj
                 + (kv + c["qk_rope_head_dim"]) * d + kv  # kv_a_proj_with_mqa, kv_a_layernorm
                 + heads * (c["qk_nope_head_dim"] + c["v_head_dim"]) * kv  # kv_b_proj
                 + d * heads * c["v_head_dim"])  # o_proj
    experts = (c["n_routed_experts"] + c["n_shared_experts"]) * 3 * c["moe_intermediate_size"] * d
    return 2 * (attention + 2 * d + experts) + 4 * c["n_routed_experts"] * d


def test_deepseek_streams_on_one_h100():
    gib = 2**30
    for count in (1, 2):
        plan = plan_pair("deepseek-v3", tokens=250, gpu="h100", count=count, with_cheapest=count == 1)
        assert plan.strategy == "stream"
        stream = plan.strategies["stream"]
        assert stream.fits and stream.min_gpus == 1 and stream.precision == "bfloat16"
    block = _deepseek_moe_block_bf16_bytes(DEEPSEEK)
    assert block == plan.base.largest_block["bfloat16"].total
    assert 2 * block / gib < stream.peak_gib_per_gpu < 80
    # One bf16 block computes while the next is built in bf16, one FP8 checkpoint tensor
    # at a time (the fused experts filled in place): the tensor in flight is the largest
    # one as stored (the dense layers' 18432 x 7168 MLP matrices, 1 byte each) plus the
    # dequantization's three float32 chunks of 2**22 elements. Masks [1, 1, 250, 250] and
    # rotary cos/sin [1, 250, 64] per model. Then 5% margin and the 0.5 GiB context; the
    # in-flight batch (hidden states, one block's attention and activations) is the rest.
    d = DEEPSEEK["hidden_size"]
    arriving = DEEPSEEK["intermediate_size"] * d + 3 * 4 * 2**22
    contexts = 2 * (250**2 + 2 * 250 * DEEPSEEK["qk_rope_head_dim"]) * 2
    floor = (2 * block + arriving + contexts) / gib * 1.05 + 0.5
    assert floor < stream.peak_gib_per_gpu < floor + 0.2
    # Host: per model two bf16 states and the float32 metrics of all 62 states.
    states = DEEPSEEK["num_hidden_layers"] + 1
    per_model = 2 * 250 * d * 2 + (3 * 250 * d * 4 + 30 * states * 250 * 4) / 2
    assert stream.host_gib == pytest.approx(2 * per_model / gib + 0.055)
    # Time: each FP8 checkpoint read once at 2 GB/s (the compute hides under it), plus
    # one bf16 state per block written at 1 GB/s, plus set-up.
    read = plan.base.weights["fp8"].total / 2e9
    frontier = DEEPSEEK["num_hidden_layers"] * 250 * d * 2 / 1e9
    assert stream.est_seconds == pytest.approx(1.5 + 2 * (0.3 + read + frontier))
    assert plan_pair("deepseek-v3", tokens=250, gpu="h100", with_cheapest=True).cheapest["strategy"] == "stream"


def test_a_pair_that_fits_resident_still_runs_resident():
    plan = plan_pair("qwen0.5b", tokens=250, gpu="h100", with_cheapest=False)
    assert plan.strategy == "resident" and plan.strategies["stream"].fits


def test_auto_never_picks_nf4_and_a_request_still_plans_it():
    auto = plan_pair("llama405b", tokens=250, gpu="h100", count=8, with_cheapest=False)
    fitting = {name for name, r in auto.strategies.items() if r.fits}
    assert fitting == {"nf4", "stream"} and auto.strategy == "stream"
    requested = plan_pair("llama405b", tokens=250, gpu="h100", count=8, strategy="nf4", with_cheapest=False)
    assert requested.strategy == "nf4" and requested.chosen.min_gpus == 3


def test_gguf_cannot_stream_and_nf4_is_offered_as_an_opt_in():
    from lens_compare.hardware.estimate import Checkpoint
    from lens_compare.hardware.sources import ModelSource

    gguf = ModelSource("g", QWEN7B, Checkpoint("gguf", gguf_file_bytes=4 * 2**30))
    plan = plan_models(gguf, gguf, Workload(tokens=50), catalog_machine("t4"), with_cheapest=False)
    stream = plan.strategies["stream"]
    assert not stream.fits and stream.min_gpus is None
    assert "needs a safetensors checkpoint" in stream.reason
    assert "python -m lens_compare.convert SRC OUT" in stream.reason
    # Only nf4 fits: nothing is chosen, and the explanation says how to ask for it.
    assert plan.strategy is None and plan.strategies["nf4"].fits
    assert "--strategy nf4" in plan.explain()


def test_a_side_loaded_as_nf4_cannot_stream():
    from lens_compare.hardware.estimate import Checkpoint
    from lens_compare.hardware.sources import ModelSource

    source = ModelSource("q", QWEN7B, Checkpoint("bfloat16"))
    plan = plan_models(source, source, Workload(tokens=50), catalog_machine("h100"), with_cheapest=False,
                       side_precisions=(None, "nf4"))
    assert not plan.strategies["stream"].fits and "NF4" in plan.strategies["stream"].reason


def test_stream_host_grows_with_prompts_and_the_device_only_by_the_masks_and_rotary():
    from lens_compare.hardware.estimate import Checkpoint
    from lens_compare.hardware.sources import ModelSource

    source = ModelSource("q", QWEN7B, Checkpoint("bfloat16"))
    h100 = catalog_machine("h100")
    one, many = (
        plan_models(source, source, Workload(tokens=100, batch=n, forward_batch=1), h100,
                    with_cheapest=False).strategies["stream"]
        for n in (1, 64)
    )
    gib = 2**30
    # Qwen2.5-7B: d_model 3584, 28 layers (29 states), head_dim 128. Per prompt and model the
    # device keeps bf16 masks [1, 1, 100, 100] (two: qwen2 may add a sliding-window one) and
    # rotary cos/sin [1, 100, 128]; the in-flight batch stays one prompt.
    contexts = 2 * (2 * 100**2 + 2 * 100 * 128) * 2
    assert many.peak_gib_per_gpu - one.peak_gib_per_gpu == pytest.approx(63 * contexts / gib * 1.05)
    per_prompt = 2 * (2 * 100 * 3584 * 2 + (3 * 100 * 3584 * 4 + 30 * 29 * 100 * 4) / 2)
    assert many.host_gib - one.host_gib == pytest.approx(63 * per_prompt / gib)


@pytest.mark.parametrize("pair, expected", [("qwen0.5b", {"float32"}), ("smollm2-dtype", {"float32", "bfloat16"})])
def test_plan_here_uses_the_dtypes_run_would(pair, expected, monkeypatch, capsys):
    """``plan --here`` plans what ``lens_compare.run`` would run: float32 by default, a pair's own dtypes."""
    from lens_compare import plan as plan_cli

    monkeypatch.setattr(plan_cli, "detect_machine", lambda: Machine("cpu", 1, 64.0, 64.0))
    assert main(["--pair", pair, "--here", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {out["dtype"]["base"], out["dtype"]["sft"]} == expected
    assert main(["--pair", pair, "--gpu", "h100", "--json"]) == 0
    catalog = json.loads(capsys.readouterr().out)
    if pair == "qwen0.5b":
        assert catalog["dtype"]["base"] == "bfloat16"


def test_plan_text_says_which_layout_each_gpu_count_is_for():
    plan = plan_pair("llama405b", tokens=250, gpu="h100", count=8, with_cheapest=False)
    nf4 = plan.strategies["nf4"]
    assert (nf4.layout, nf4.min_gpus, nf4.min_gpus_layout) == ("resident", 3, "sequential")
    text = plan.explain()
    assert "nf4        [nf4, resident layout] fits" in text
    assert "min GPUs 3 (sequential layout there)" in text
    assert "resident (both models loaded at once) needs 22 GPUs in bfloat16" in text
    assert plan.to_dict()["strategies"]["nf4"]["min_gpus_layout"] == "sequential"


def test_checkpoint_dtype_is_read_without_the_torch_dtype_deprecation(smollm2_gguf, caplog):
    """A GGUF's config object has no dtype: checkpoint_of must not fall back to its deprecated
    torch_dtype property (transformers logs '`torch_dtype` is deprecated' once per process)."""
    import logging

    from transformers import AutoConfig, LlamaConfig

    from lens_compare.hardware.sources import checkpoint_of

    config = AutoConfig.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    probe = LlamaConfig()
    probe.dtype = None
    touched = []
    original = type(probe).__getattribute__

    def spy(self, name):
        if name == "torch_dtype":
            touched.append(name)
        return original(self, name)

    with caplog.at_level(logging.WARNING):
        type(probe).__getattribute__ = spy
        try:
            assert checkpoint_of(probe).precision == "float32"
            assert checkpoint_of(config).precision == "float32"
        finally:
            type(probe).__getattribute__ = original
    assert touched == []
    assert checkpoint_of({"torch_dtype": "bfloat16"}).precision == "bfloat16"
    assert checkpoint_of({"dtype": "float16"}).precision == "float16"


def test_the_analyses_count_in_the_run_memory():
    """Sublayer outputs are two more [batch, tokens, d_model] per block and model; the logit lens
    keeps the first model's unembedding through a sequential run and streams both heads in."""
    from dataclasses import replace

    from lens_compare.hardware.machine import catalog_machine
    from lens_compare.hardware.planner import plan_models, sources_for
    from lens_compare.hardware.run_memory import Workload

    machine = catalog_machine("H100 SXM 80GB", 1, None)
    base, sft = sources_for("llama8b", None, None)
    workload = Workload(tokens=250, batch=8)

    def peaks(**changes):
        plan = plan_models(base, sft, replace(workload, **changes), machine, pair="llama8b", with_cheapest=False)
        return {name: result.peak_gib_per_gpu for name, result in plan.strategies.items()}

    plain, components, lens = peaks(), peaks(components=64), peaks(logit_lens=True)
    writes = 2 * 64 * 8 * 250 * 4096 * 2 / 2**30  # both models' sublayer outputs, bfloat16
    # with the 5% allocator overhead
    assert components["resident"] - plain["resident"] == pytest.approx(writes, rel=0.06)
    head = 128256 * 4096 * 2 / 2**30
    assert lens["sequential"] - plain["sequential"] == pytest.approx(head, rel=0.06)
    assert lens["stream"] > 2 * head > plain["stream"]  # both heads at once, after the last block


def test_hub_ids_plan_offline_from_the_shipped_configs_and_others_fail_at_once(monkeypatch, capsys):
    """Planning reads no network for the models whose configs the package ships (the seed's pairs, both
    sides); any other hub id fails in one line at once, offline, instead of retrying for half a minute."""
    import time

    from lens_compare.models.hub import hub_reachable

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_reachable.cache_clear()
    try:
        assert main(["--base", "Qwen/Qwen2.5-0.5B", "--sft", "Qwen/Qwen2.5-0.5B-Instruct", "--json"]) == 0
        planned = json.loads(capsys.readouterr().out)
        assert planned["base_params"] == planned["sft_params"] == 494_032_768
        started = time.perf_counter()
        assert main(["--base", "someone/not-a-shipped-model", "--sft", "someone/other", "--json"]) == 1
        err = capsys.readouterr().err
        assert time.perf_counter() - started < 10
        assert "cannot read the config of 'someone/not-a-shipped-model'" in err and "not in the local" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        hub_reachable.cache_clear()


def test_the_steering_checks_seconds_by_hand():
    """``steering_time_estimate`` against the cost model written out (lens_compare.hardware.timing's
    steering_seconds): Qwen2.5-7B steered at layers 0, 14, 27 by 3 multiples, 8 prompts of 100 tokens."""
    from lens_compare.hardware.planner import steering_time_estimate

    params, vocab, d_model, n_layers = 7_615_616_512, 152_064, 3584, 28
    tokens, prompts, layers, alphas = 100, 8, (0, 14, 27), 3
    branches = len(layers) * alphas
    read = 2 * params / 2e9  # the bfloat16 checkpoint at 2 GB/s
    share = alphas * ((n_layers - 1) + (n_layers - 15) + 0) / n_layers  # of a base forward, streamed
    cpu, h100 = Machine("cpu", 1, 64.0, 64.0), catalog_machine("H100 SXM 80GB", 1)

    def estimate(machine, schedule, held=0):
        return steering_time_estimate({"base": QWEN7B, "sft": QWEN7B}, {"base": "bfloat16", "sft": "bfloat16"},
                                      machine, tokens=tokens, prompts=prompts, forward_batch=4, lens_layers=1,
                                      schedule=schedule, layers=layers, alphas=alphas, held_out_prompts=held)

    # The CPU: 100 GFLOP/s; a head at 80% of it.
    forward = 2 * params * tokens * prompts / 100e9
    head = 2 * vocab * d_model * tokens * prompts / (100e9 * 0.8)
    resident = (forward + head) + (1 + branches) * (forward + head)  # SFT, base, the steered branches
    assert estimate(cpu, "resident")["steering"] == pytest.approx(resident, rel=1e-9)
    # sequential loads the base model once more: per-model work, the bridge's boot, the read
    assert estimate(cpu, "sequential")["steering"] == pytest.approx(resident + 0.3 + 0.045 * n_layers + read, rel=1e-9)
    # 4 held-out prompts cost what 4 of the run's do
    assert estimate(cpu, "resident", held=4)["steering"] == pytest.approx(resident * 1.5, rel=1e-9)
    # stream on the CPU: the branches' compute outweighs re-reading the blocks after layer 0
    heads = (2 + branches) * head
    assert estimate(cpu, "stream")["steering"] == pytest.approx(share * forward + heads, rel=1e-9)
    held_forward = forward / 2  # 4 prompts
    streamed_held = (1 + share) * held_forward + held_forward + heads / 2  # both reads are shorter than these
    assert estimate(cpu, "stream", held=4)["steering"] == pytest.approx(share * forward + heads + streamed_held,
                                                                         rel=1e-9)

    # The H100: forwards at 40% of 989 TFLOP/s (more than the weights' read at 3.35 TB/s for 2 batches of 4).
    rate = 989e12 * 0.4
    forward = 2 * params * tokens * prompts / rate
    assert forward > 2 * 2 * params / 3350e9
    head = 2 * vocab * d_model * tokens * prompts / (rate * 0.8)
    assert estimate(h100, "resident")["steering"] == pytest.approx((2 + branches) * (forward + head), rel=1e-9)
    # stream: re-reading blocks 1..27 from disk outweighs the branches' compute
    assert share * forward < read * 27 / 28
    assert estimate(h100, "stream")["steering"] == pytest.approx(read * 27 / 28 + (2 + branches) * head, rel=1e-9)

    # The core run it is weighed against is the planner's own figure for the run on that engine.
    workload = Workload(tokens=tokens, batch=prompts, forward_batch=4, lens_layers=1)
    source = ModelSource("Qwen/Qwen2.5-7B", QWEN7B, checkpoint_of(QWEN7B))
    plan = plan_models(source, source, workload, cpu, with_cheapest=False)
    for schedule in ("resident", "stream"):
        assert estimate(cpu, schedule)["run"] == pytest.approx(plan.strategies[schedule].est_seconds, rel=1e-9)
