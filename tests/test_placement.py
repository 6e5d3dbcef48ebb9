"""Splitting models over GPUs: the planner's layout, the device maps, the refusals, the bridge hand-off.

No GPU is needed: real configs are built on the meta device (two full-width layers of
Llama-3.1-70B, Qwen2.5-72B and DeepSeek-V3) and planned on fake machines of 2, 4 and
8 GPUs sized so the pair must be split.
"""

import dataclasses
import logging

import pytest
import torch

from lens_compare.errors import HardwareError
from lens_compare.hardware import Machine, Workload, plan_models
from lens_compare.hardware.gpus import resolve_gpu
from lens_compare.hardware.layout import Layout, place
from lens_compare.hardware.sources import ModelSource, checkpoint_of, model_configs
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.placement import (
    accelerate_map,
    block_names,
    greedy_map,
    meta_model,
    placement_units,
    split_loads,
    summarize_placement,
)
from lens_compare.util.units import GIB
from tests.fixtures.fake_cuda import H100, fake_cuda

REAL = ("meta-llama/Llama-3.1-70B", "Qwen/Qwen2.5-72B", "deepseek-ai/DeepSeek-V3-Base")
WORKLOAD = Workload(tokens=100, batch=2, base_dtype="bfloat16", sft_dtype="bfloat16")


def two_layers(key: str) -> dict:
    """The real config, two layers deep (DeepSeek: one dense, one MoE), loaded in bf16."""
    config = dict(model_configs()[key])
    config["num_hidden_layers"] = 2
    if "first_k_dense_replace" in config:
        config["first_k_dense_replace"] = 1
    config.pop("quantization_config", None)
    return config


def fake_machine(config: dict, n_gpus: int, strategy: str) -> Machine:
    """n A100-like GPUs, each just big enough for an even share of the weights plus one module."""
    source = ModelSource("m", config, checkpoint_of(config))
    gpu = resolve_gpu("a100")
    roomy = Machine("cuda", 1, 1e6, 1e6, gpu, gpu.name)
    estimate = plan_models(source, source, WORKLOAD, roomy, with_cheapest=False).base
    chunks = estimate.chunks["bfloat16"]
    models = 2 if strategy == "resident" else 1
    weights = (models * sum(chunks) / n_gpus + max(chunks)) / GIB
    return dataclasses.replace(roomy, count=n_gpus, device_gib=(weights + 0.05) * 1.05 + 0.5, host_ram_gib=1e4)


def plan(config: dict, machine: Machine, strategy: str):
    source = ModelSource("m", config, checkpoint_of(config))
    return plan_models(source, source, WORKLOAD, machine, strategy=strategy, with_cheapest=False)


@pytest.fixture(scope="module")
def metas():
    return {key: meta_model(two_layers(key), "bfloat16") for key in REAL}


@pytest.mark.parametrize("key", REAL)
def test_planner_chunks_are_the_meta_models_placement_units(key, metas):
    """The planner's module sizes (from the config alone) equal accelerate's on the built model."""
    config = two_layers(key)
    source = ModelSource("m", config, checkpoint_of(config))
    estimate = plan_models(source, source, WORKLOAD, fake_machine(config, 1, "resident"), with_cheapest=False).base
    units = placement_units(metas[key])
    assert [size for _, size in units] == list(estimate.chunks["bfloat16"])
    assert [name for name, _ in units][:2] == ["model.embed_tokens", "model.layers.0"]


@pytest.mark.parametrize("strategy", ["resident", "sequential"])
@pytest.mark.parametrize("n_gpus", [2, 4, 8])
@pytest.mark.parametrize("key", REAL)
def test_device_maps_follow_the_planners_layout(key, n_gpus, strategy, metas, caplog):
    config = two_layers(key)
    machine = fake_machine(config, n_gpus, strategy)
    chosen = plan(config, machine, strategy).chosen
    assert chosen is not None and chosen.fits and chosen.splits
    loads = {role: LoadOptions("bfloat16", "cuda:0") for role in ("base", "sft")}
    gpus = tuple(range(10, 10 + n_gpus))  # any CUDA indices: the planner's GPU i is gpus[i]
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        split = split_loads(loads, chosen, {"base": config, "sft": config}, gpus)
    units = [name for name, _ in placement_units(metas[key])]
    for index, role in enumerate(("base", "sft")):
        layout = chosen.splits[0 if strategy == "resident" else index]
        options = split[role]
        assert options.split and options.device == "cuda:10"
        assert set(options.device_map) == set(units)
        assert all(isinstance(d, int) for d in options.device_map.values()), "never cpu or disk"
        expected = layout.assignment[index if strategy == "resident" else 0]
        assert tuple(options.device_map[u] - 10 for u in units) == expected
        # each GPU's budget is the planner's; resident SFT gets what the base left
        assert set(options.max_memory) == set(gpus)
        if strategy == "sequential" or role == "base":
            assert set(options.max_memory.values()) == {layout.budget}
    if strategy == "resident":
        base_used = {g: 0 for g in gpus}
        for name, size in placement_units(metas[key]):
            base_used[split["base"].device_map[name]] += size
        assert split["sft"].max_memory == {g: chosen.splits[0].budget - base_used[g] for g in gpus}
        # the two models' weights per GPU are the planner's per-GPU figures
        per_gpu = [base_used[g] for g in gpus]
        for name, size in placement_units(metas[key]):
            per_gpu[split["sft"].device_map[name] - 10] += size
        assert tuple(per_gpu) == chosen.splits[0].per_gpu
    assert "model split" in caplog.text


def test_accelerate_without_the_sentinel_would_not_follow_the_layout(metas):
    """Why the zero-budget 'mps' entry: plain infer_auto_device_map keeps room on GPU 0."""
    from accelerate.utils import infer_auto_device_map

    model = metas["meta-llama/Llama-3.1-70B"]
    units = placement_units(model)
    budget = sum(size for _, size in units[:3])  # exactly embed + two blocks
    budgets = {0: budget, 1: budget * 2}
    ours = accelerate_map(model, budgets)
    assert ours == greedy_map(units, budgets)
    assert ours["model.layers.1"] == 0
    plain = infer_auto_device_map(model, max_memory=budgets, no_split_module_classes=["LlamaDecoderLayer"])
    assert plain.get("model.layers.1", plain.get("model.layers", plain.get("model"))) != 0


def test_a_map_that_would_offload_is_refused_with_what_fits(metas):
    config = two_layers("meta-llama/Llama-3.1-70B")
    units = placement_units(metas["meta-llama/Llama-3.1-70B"])
    too_small = sum(size for _, size in units) // 3
    layout = Layout(budget=too_small, assignment=((0,) * len(units), (1,) * len(units)),
                    per_gpu=(too_small, too_small), ceiling=too_small)
    chosen = type("Chosen", (), {"splits": (layout,)})()
    loads = {role: LoadOptions("bfloat16", "cuda:0") for role in ("base", "sft")}
    with pytest.raises(HardwareError, match=r"would be offloaded to cpu/disk; what fits instead: nf4 on 1 GPU"):
        split_loads(loads, chosen, {"base": config, "sft": config}, (0, 1),
                    alternatives="; what fits instead: nf4 on 1 GPU(s)")


def test_a_larger_real_module_falls_back_to_the_ceiling(metas):
    """If the meta model's modules outgrow the balanced budget, each GPU may take up to its ceiling."""
    config = two_layers("Qwen/Qwen2.5-72B")
    units = placement_units(metas["Qwen/Qwen2.5-72B"])
    total = sum(size for _, size in units)
    layout = place([tuple(s for _, s in units)], 2, total)
    tight = dataclasses.replace(layout, budget=layout.budget - 1, ceiling=total)
    chosen = type("Chosen", (), {"splits": (tight, tight)})()
    loads = {role: LoadOptions("bfloat16", "cuda:0") for role in ("base", "sft")}
    split = split_loads(loads, chosen, {"base": config, "sft": config}, (0, 1))
    assert set(split["base"].max_memory.values()) == {total}


def test_nf4_layout_uses_four_bit_sizes(metas):
    model = metas["meta-llama/Llama-3.1-70B"]
    plain = dict(placement_units(model))
    nf4 = dict(placement_units(model, "nf4"))
    block = model.model.layers[0]
    linear = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    others = sum(p.numel() * 2 for n, p in block.named_parameters() if "proj" not in n)
    assert nf4["model.layers.0"] == linear // 2 + linear // 64 * 4 + others
    assert nf4["lm_head"] == plain["lm_head"] and nf4["model.embed_tokens"] == plain["model.embed_tokens"]


def test_placement_summary_lists_blocks_and_gib_per_device(metas):
    model = metas["Qwen/Qwen2.5-72B"]
    units = placement_units(model)
    device_map = {name: (0 if index < 2 else 1) for index, (name, _) in enumerate(units)}
    summary = summarize_placement(model, device_map, block_names(model))
    assert summary["cuda:0"]["blocks"] == [0] and summary["cuda:1"]["blocks"] == [1]
    assert summary["cuda:0"]["gib"] == pytest.approx((units[0][1] + units[1][1]) / GIB, abs=1e-4)
    assert sum(entry["gib"] for entry in summary.values()) == pytest.approx(
        sum(size for _, size in units) / GIB, abs=1e-3)


def test_tied_head_sits_with_the_embedding():
    config = dict(model_configs()["Qwen/Qwen2.5-0.5B"])
    model = meta_model(config, "bfloat16")
    units = placement_units(model)
    names = [name for name, _ in units]
    assert names[1] == "lm_head" and dict(units)["lm_head"] == 0
    budget = dict(units)["model.embed_tokens"] + 1
    assert accelerate_map(model, {0: budget, 1: 10**12})["lm_head"] == 0


def test_preflight_splits_a_pair_over_the_fewest_gpus_it_needs(monkeypatch, metas):
    """The whole chain on a fake 4-GPU machine: the planner's pick, its split, the maps."""
    from lens_compare.models.architecture import transformers_config
    from lens_compare.models.loading import ModelRef
    from lens_compare.models.refs import Side
    from lens_compare.pipeline import preflight
    from lens_compare.pipeline.execution import PlanFacts

    config = transformers_config(two_layers("meta-llama/Llama-3.1-70B"))
    units = placement_units(metas["meta-llama/Llama-3.1-70B"])
    weights_gib = sum(size for _, size in units) / GIB
    # each GPU holds a little more than one model: resident needs 3 of the 4
    fake_cuda(monkeypatch, [(*H100, (weights_gib * 0.8 + 1.0) * 1024)] * 4)
    ref = ModelRef("meta-llama/Llama-3.1-70B", "hub", "meta-llama/Llama-3.1-70B")
    facts = PlanFacts(
        pair="llama70b-2layer", base=Side("base", ref, "bfloat16"), sft=Side("sft", ref, "bfloat16"),
        configs={"base": config, "sft": config}, device="cuda", gpus=(0, 1, 2, 3), layers=(0, 1),
        n_prompts=2, max_tokens=100, batch_size=2, strategy="resident", held_prompts=2,
    )
    execution = preflight.memory_preflight(facts)
    assert execution.strategy == execution.schedule == "resident"
    used = {g for options in execution.loads.values() for g in options.device_map.values()}
    assert used == {0, 1, 2}, "the fewest GPUs that fit, the fourth stays free"
    assert all(set(options.max_memory) == {0, 1, 2} for options in execution.loads.values())
    assert execution.estimate["machine"].startswith("3x")
    # a forced sequential run splits each model on its own, over the GPUs one model needs
    sequential = preflight.memory_preflight(dataclasses.replace(facts, strategy="sequential"))
    assert {g for g in sequential.loads["base"].device_map.values()} == {0, 1}


def test_what_the_loader_and_the_bridge_receive_for_a_split(monkeypatch, tiny_model_dirs):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM

    from lens_compare.capture.states import boot_bridge
    from lens_compare.models.loading import load_config, load_hf_model, resolve_ref

    seen = {}

    class Loaded:
        def eval(self):
            return self

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda location, **kwargs: seen.update(load=(location, kwargs)) or Loaded())
    # A module stands for the bridge: boot_bridge adjusts the norms of what it gets back.
    monkeypatch.setattr(TransformerBridge, "boot_transformers",
                        lambda *a, **kwargs: seen.update(boot=kwargs) or torch.nn.Module())
    ref = resolve_ref(str(tiny_model_dirs["llama"]))
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.layers.2": 1,
                  "model.norm": 1, "model.rotary_emb": 1, "lm_head": 1}
    options = LoadOptions("bfloat16", "cuda:0", device_map=device_map, max_memory={0: 10**9, 1: 10**9})
    model = load_hf_model(ref, load_config(ref), options)
    location, kwargs = seen["load"]
    assert kwargs["device_map"] == device_map and kwargs["max_memory"] == {0: 10**9, 1: 10**9}
    assert kwargs["dtype"] == torch.bfloat16 and kwargs["attn_implementation"] == "eager"
    boot_bridge(model, ref, None, options)
    assert seen["boot"]["hf_model"] is model and seen["boot"]["device"] is None
    assert "device_map" not in seen["boot"] and "max_memory" not in seen["boot"]
