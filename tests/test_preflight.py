"""The checks made before any weights load: the planner's verdict and the local_run guard."""

import logging

import pytest

import lens_compare
from lens_compare.engines import loaded as model_loading
from lens_compare.errors import HardwareError
from lens_compare.hardware import Machine
from lens_compare.hardware.local_run import GpuFacts
from lens_compare.pipeline import comparison, preflight
from lens_compare.pipeline.prepare import prepare_run
from lens_compare.run import main
from tests.fixtures.fake_cuda import fake_cuda

PROMPTS = ["the quick brown fox", "hello world"]


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(model_loading, "load_hf_model", refuse)


def test_run_that_cannot_fit_is_refused_before_loading(tiny_model_dirs, monkeypatch, no_weights):
    monkeypatch.setattr(preflight, "machine_for", lambda device, gpus: Machine("cpu", 1, 1e-4, 1e-4))
    directory = str(tiny_model_dirs["llama"])
    with pytest.raises(HardwareError, match="refusing to load: nothing fits"):
        lens_compare.compare(base=directory, sft=directory, prompts=PROMPTS)


def test_planner_chooses_the_strategy_and_logs_its_plan(tiny_model_dirs, monkeypatch, caplog):
    seen = {}

    def spy(facts):
        execution = preflight.memory_preflight(facts)
        seen["strategy"] = execution.strategy
        return execution

    directory = str(tiny_model_dirs["llama"])
    config = lens_compare.RunConfig(base_model=directory, sft_model=directory, prompts=tuple(PROMPTS))
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        result = comparison.run_comparison(config, preflight=spy)
    assert result.provenance["strategy"] == seen["strategy"] == "resident"
    assert "plan: resident on CPU" in caplog.text


def _local_run_config(tmp_path, base, sft, entry_device="cpu"):
    path = tmp_path / "local.yaml"
    path.write_text(
        "residual_compare:\n"
        f"  base_model: {base}\n  sft_model: {sft}\n  prompts: [hello world]\n"
        "  local_run:\n    enabled: true\n    min_vram_gb: 24\n"
        "    require_gpu_name_substring: '4090'\n    cuda_device_index: 0\n"
        f"    allowed_pairs:\n      - base: {base}\n        sft: {sft}\n"
        f"        device: {entry_device}\n        dtype: bfloat16\n"
    )
    return path


def test_local_run_without_cuda_stops_at_once(tiny_model_dirs, tmp_path, monkeypatch, capsys, no_weights):
    monkeypatch.chdir(tmp_path)
    directory = str(tiny_model_dirs["llama"])
    config = _local_run_config(tmp_path, directory, directory)
    assert main(["--config", str(config), "--out", "res"]) == 1
    assert "CUDA" in capsys.readouterr().err
    assert not (tmp_path / "res").exists() or not any((tmp_path / "res").iterdir())


def test_local_run_rejects_a_pair_not_listed(tiny_model_dirs, tmp_path, monkeypatch, capsys, no_weights):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "query_cuda_device",
                        lambda index: GpuFacts("NVIDIA GeForce RTX 4090", index, 23.99))
    config = _local_run_config(tmp_path, str(tiny_model_dirs["llama"]), str(tiny_model_dirs["llama"]))
    other = str(tiny_model_dirs["mistral"])
    assert main(["--config", str(config), "--base", other, "--sft", other, "--out", "res"]) == 1
    assert "not in residual_compare.local_run.allowed_pairs" in capsys.readouterr().err


def test_approved_local_run_logs_first_and_applies_its_overrides(tiny_model_dirs, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(preflight, "query_cuda_device",
                        lambda index: GpuFacts("NVIDIA GeForce RTX 4090", index, 23.99))
    directory = str(tiny_model_dirs["qwen2"])
    config = lens_compare.config.load_config_file(_local_run_config(tmp_path, directory, directory))
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        result = comparison.run_comparison(config)
    messages = [record.getMessage() for record in caplog.records]
    approved = next(i for i, m in enumerate(messages) if m.startswith("Local GPU execution enabled"))
    first_load = next(i for i, m in enumerate(messages) if m.startswith("loading base model"))
    assert approved < first_load
    assert "NVIDIA GeForce RTX 4090" in messages[approved] and "cuda:0" in messages[approved]
    assert result.provenance["dtype"] == {"base": "bfloat16", "sft": "bfloat16"}


def test_malformed_local_run_block_is_refused_with_its_path(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("residual_compare:\n  pair: llama8b\n  local_run:\n    enabled: yes\n    min_vram: 24\n")
    assert main(["--config", str(path)]) == 1
    assert "residual_compare.local_run.min_vram" in capsys.readouterr().err


def test_auto_never_runs_nf4_unasked_and_the_refusal_says_it_would_fit(tiny_model_dirs, monkeypatch):
    """When only NF4 fits, auto refuses (4-bit weights change the numbers) and names the opt-in."""
    from dataclasses import replace

    real_plan_models = preflight.plan_models

    def nf4_only(*args, **kwargs):
        plan = real_plan_models(*args, **kwargs)
        results = {name: replace(r, fits=r.name == "nf4", min_gpus=1 if r.name == "nf4" else None,
                                 reason=None if r.name == "nf4" else "needs more than this machine")
                   for name, r in plan.strategies.items()}
        return replace(plan, strategies=results, strategy=None)

    monkeypatch.setattr(preflight, "plan_models", nf4_only)
    directory = str(tiny_model_dirs["llama"])
    run = prepare_run(lens_compare.RunConfig(base_model=directory, sft_model=directory,
                                                      prompts=tuple(PROMPTS)))
    with pytest.raises(HardwareError, match=r"nothing fits on CPU .*\(nf4 would fit: --strategy nf4, read against "
                                            r"the NF4 noise floor\); resident: needs more than this machine"):
        preflight.memory_preflight(run.plan_facts())


def test_family_the_planner_cannot_model_runs_with_a_warning(tmp_path, caplog):
    """GPT-NeoX bridges fine but has no planner rule: the run goes on, and says so."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.fixtures.tiny_models import build_tokenizer

    tokenizer = build_tokenizer(tmp_path)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128, max_position_embeddings=256)
    GPTNeoXForCausalLM(config).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="lens_compare"):
        result = lens_compare.compare(base=str(tmp_path), sft=str(tmp_path), prompts=PROMPTS)
    assert "no memory check for this run: model_type 'gpt_neox'" in caplog.text
    assert result.provenance["strategy"] == "sequential"
    assert abs(result.to_dict()["resid_post"][-1]["cosine"]["min"] - 1) <= 1e-6


def test_plan_uses_the_gpus_the_run_was_given(monkeypatch):
    """A cuda:1 run is planned on GPU 1 alone, by what is free on it (plus this process's context)."""
    fake_cuda(monkeypatch, [("NVIDIA H100 80GB HBM3", 81559, 81400), ("NVIDIA GeForce RTX 4090", 24564, 20000)])
    machine = preflight.machine_for("cuda:1", (1,))
    assert (machine.device_name, machine.count, machine.gpu.name) == ("NVIDIA GeForce RTX 4090", 1, "RTX 4090")
    assert machine.device_gib == pytest.approx(20000 / 1024 + 0.5)
    both = preflight.machine_for("cuda", (0, 1))
    assert both.count == 2 and both.device_name == "NVIDIA H100 80GB HBM3"
    assert both.device_gib == pytest.approx(20000 / 1024 + 0.5), "planned on the smallest free device"
    assert preflight.machine_for("cuda", (0,)).device_gib == pytest.approx(81559 / 1024), "capped at total"
