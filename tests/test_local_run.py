"""The local_run guard, with the device facts passed in as data."""

import pytest

from lens_compare.errors import ConfigError, HardwareError
from lens_compare.hardware import GpuFacts, LocalRunConfig, check_local_run, query_cuda_device

SEED = {
    "enabled": True,
    "min_vram_gb": 24,
    "require_gpu_name_substring": "4090",
    "cuda_device_index": 0,
    "allowed_pairs": [
        {"base": "gpt2", "sft": "gpt2", "device": "cuda", "dtype": "float16",
         "notes": "Lightweight sanity-check pair for desktop runs"},
    ],
}
RTX4090 = GpuFacts("NVIDIA GeForce RTX 4090", 0, 24564 / 1024)


def test_seed_example_approves_a_4090():
    approval = check_local_run(LocalRunConfig.from_dict(SEED), "gpt2", "gpt2", RTX4090)
    assert approval.device == "cuda:0" and approval.dtype == "float16"
    assert approval.log_line == (
        "Local GPU execution enabled: NVIDIA GeForce RTX 4090 (cuda:0, 23.99 GiB total VRAM)"
    )


def test_overrides_are_applied():
    data = {**SEED, "cuda_device_index": 1, "allowed_pairs": [{
        "base": "a", "sft": "b", "tokenizer": "tok", "tokenizer_kwargs": {"use_fast": True},
        "model_kwargs": {"attn_implementation": "eager"}}]}
    approval = check_local_run(LocalRunConfig.from_dict(data), "a", "b", GpuFacts("RTX 4090", 1, 23.99))
    assert approval.device == "cuda:1" and approval.tokenizer == "tok"
    assert approval.tokenizer_kwargs == {"use_fast": True}
    assert approval.model_kwargs == {"attn_implementation": "eager"}


@pytest.mark.parametrize(
    "gpu,base,match",
    [
        (None, "gpt2", "CUDA is not available"),
        (GpuFacts("NVIDIA GeForce RTX 3090", 0, 23.99), "gpt2", "does not contain"),
        (GpuFacts("NVIDIA GeForce RTX 4090 Laptop", 0, 15.99), "gpt2", "below min_vram_gb"),
        (RTX4090, "Qwen/Qwen2.5-7B", "not in residual_compare.local_run.allowed_pairs"),
    ],
)
def test_each_failed_check_stops(gpu, base, match):
    with pytest.raises(HardwareError, match=match):
        check_local_run(LocalRunConfig.from_dict(SEED), base, "gpt2", gpu)


def test_disabled_is_refused():
    with pytest.raises(HardwareError, match="enabled is false"):
        check_local_run(LocalRunConfig.from_dict({**SEED, "enabled": False}), "gpt2", "gpt2", RTX4090)


def test_every_config_problem_in_one_error():
    bad = {
        "enabled": "yes",
        "min_vram_gbs": 24,
        "cuda_device_index": -1,
        "allowed_pairs": [{"base": "gpt2", "dtype": "fp4", "device": "tpu", "extra": 1}],
    }
    with pytest.raises(ConfigError) as info:
        LocalRunConfig.from_dict(bad)
    msg = str(info.value)
    for needle in (
        "residual_compare.local_run.enabled: expected bool",
        "min_vram_gbs: unknown key (did you mean 'min_vram_gb'?)",
        "cuda_device_index: -1 must be >= 0",
        "allowed_pairs[0].sft: missing",
        "allowed_pairs[0].dtype: 'fp4'",
        "allowed_pairs[0].device: 'tpu'",
        "allowed_pairs[0].extra: unknown key",
    ):
        assert needle in msg


def test_bool_is_not_a_number():
    with pytest.raises(ConfigError, match="min_vram_gb: expected int or float, got True"):
        LocalRunConfig.from_dict({**SEED, "min_vram_gb": True})


def test_query_without_cuda_returns_none():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: covered by the device check")
    assert query_cuda_device(0) is None
