"""Every strategy against resident: sequential and split exactly, NF4 against a direct HF NF4 forward."""

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lens_compare import RunConfig
from lens_compare.engines import loaded as model_loading
from lens_compare.metrics.residual import METRIC_NAMES
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.placement import meta_model, placement_units
from lens_compare.pipeline.comparison import run_comparison
from lens_compare.pipeline.execution import Execution

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a b c d e f g", "two plus two is four"]


def _config(base, sft, **kw) -> RunConfig:
    return RunConfig(base_model=str(base), sft_model=str(sft), prompts=tuple(PROMPTS), batch_size=2,
                     include_first_token=True, **kw)


def _fixed(strategy: str, schedule: str, base: LoadOptions, sft: LoadOptions):
    """A preflight that returns the given execution (the planner is tested elsewhere)."""
    return lambda facts: Execution(strategy, schedule, {"base": base, "sft": sft})


def _assert_same_metrics(a, b) -> None:
    for hook in ("resid_pre", "resid_post"):
        for name in METRIC_NAMES:
            assert torch.equal(a.metrics[hook][name].nan_to_num(-7.0), b.metrics[hook][name].nan_to_num(-7.0)), \
                (hook, name)
    assert a.to_dict()["resid_post"] == b.to_dict()["resid_post"]


@pytest.fixture(scope="module")
def resident(perturbed_llama):
    base, sft, _ = perturbed_llama
    cpu = LoadOptions("float32", "cpu")
    return run_comparison(_config(base, sft), preflight=_fixed("resident", "resident", cpu, cpu), keep_residuals=True)


def test_sequential_equals_resident_exactly(perturbed_llama, resident):
    base, sft, _ = perturbed_llama
    cpu = LoadOptions("float32", "cpu")
    sequential = run_comparison(_config(base, sft), preflight=_fixed("sequential", "sequential", cpu, cpu))
    _assert_same_metrics(sequential, resident)
    assert sequential.provenance["schedule"] == "sequential"


def _dispatched_map(directory) -> dict:
    """Blocks alternate between cpu and disk: accelerate's dispatch path (hooks, meta
    parameters, an offload folder), which an all-cpu map never takes."""
    from transformers import AutoConfig

    units = [name for name, _ in placement_units(meta_model(AutoConfig.from_pretrained(directory), "float32"))]
    return {name: ("disk" if name.startswith("model.layers.") and int(name.split(".")[2]) % 2 == 0 else "cpu")
            for name in units}


def test_split_dispatched_model_equals_resident_exactly(perturbed_llama, resident, tmp_path):
    base, sft, _ = perturbed_llama
    options = {
        role: LoadOptions("float32", "cpu", device_map=_dispatched_map(path), offload_folder=str(tmp_path / role))
        for role, path in (("base", base), ("sft", sft))
    }
    split = run_comparison(_config(base, sft), keep_residuals=True,
                           preflight=_fixed("resident", "resident", options["base"], options["sft"]))
    _assert_same_metrics(split, resident)
    for mine, theirs in zip(split.residuals, resident.residuals, strict=True):
        assert torch.equal(mine.values, theirs.values)
    placement = split.provenance["placement"]["base"]
    assert placement["disk"]["blocks"] == [0, 2] and placement["cpu"]["blocks"] == [1]
    assert placement["disk"]["gib"] > 0 and placement["cpu"]["gib"] > 0


def test_split_capture_filters_the_ignored_device_warning(perturbed_llama, tmp_path, recwarn):
    base, sft, _ = perturbed_llama
    options = LoadOptions("float32", "cpu", device_map=_dispatched_map(base), offload_folder=str(tmp_path))
    run_comparison(_config(base, base), preflight=_fixed("sequential", "sequential", options, options))
    assert not [w for w in recwarn if "ignored: model is dispatched" in str(w.message)]


@pytest.mark.parametrize("logit_lens", [False, True])
def test_sequential_frees_the_first_model_before_loading_the_second(perturbed_llama, monkeypatch, logit_lens):
    """Nothing of the first model stays reachable; for the logit lens, a copy of its final norm and
    unembedding (a view would keep every page of its memory-mapped checkpoint resident)."""
    base, sft, _ = perturbed_llama
    real_load = model_loading.load_hf_model
    refs: dict[str, list] = {}
    alive_at_sft_load = []

    def tracking_load(ref, config, options):
        if refs:  # the second load
            gc.collect()
            alive_at_sft_load.append(sorted(name for name, r in refs["first"] if r() is not None))
        model = real_load(ref, config, options)
        refs.setdefault("first", [(name, weakref.ref(t)) for name, t in
                                  (*model.named_parameters(), *model.named_buffers())])
        refs.setdefault("model", [weakref.ref(model)])
        return model

    monkeypatch.setattr(model_loading, "load_hf_model", tracking_load)
    cpu = LoadOptions("float32", "cpu")
    run_comparison(_config(base, sft).replace(logit_lens=logit_lens),
                   preflight=_fixed("sequential", "sequential", cpu, cpu))
    assert len(refs["first"]) > 10
    # Every later load (the SFT model, and the base model again for the steering check, which auto
    # runs on this tiny pair) finds nothing of the first model alive.
    assert alive_at_sft_load and all(alive == [] for alive in alive_at_sft_load)
    assert refs["model"][0]() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: memory_allocated after the swap")
def test_sequential_returns_cuda_memory_to_the_baseline(perturbed_llama, monkeypatch):
    base, sft, _ = perturbed_llama
    real_load = model_loading.load_hf_model
    seen = []

    def tracking_load(ref, config, options):
        seen.append(torch.cuda.memory_allocated())
        return real_load(ref, config, options)

    monkeypatch.setattr(model_loading, "load_hf_model", tracking_load)
    cuda = LoadOptions("float32", "cuda:0")
    run_comparison(_config(base, sft), preflight=_fixed("sequential", "sequential", cuda, cuda))
    assert seen[1] == seen[0]


def _hf_nf4(directory):
    """The same NF4 model straight from transformers, computing in float32 as asked on any CPU."""
    from lens_compare.models.quantization import compute_as_asked

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    return compute_as_asked(AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=config, dtype=torch.float32, attn_implementation="eager").eval())


def test_nf4_layers_compute_in_the_compute_dtype_asked_for_on_any_cpu(perturbed_llama):
    """compute_as_asked: a 4-bit layer equals its own dequantized float32 weights in an independent
    float32 product, exactly, whether or not the CPU has AVX512-BF16 (where stock bitsandbytes
    repacks the weights and computes in bfloat16)."""
    import bitsandbytes.functional as bnb_functional

    base, _, _ = perturbed_llama
    model = _hf_nf4(base)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)
    torch.manual_seed(0)
    for layer in layers[:4]:
        x = torch.randn(2, 5, layer.in_features)
        weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        expected = torch.nn.functional.linear(x, weight, layer.bias)
        with torch.no_grad():
            got = layer(x)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_nf4_capture_equals_the_same_nf4_models_hf_hidden_states(perturbed_llama):
    from lens_compare.metrics.residual import cross_model

    base, sft, _ = perturbed_llama
    nf4 = LoadOptions("float32", "cpu", quantization="nf4")
    result = run_comparison(_config(base, sft), preflight=_fixed("nf4", "resident", nf4, nf4), keep_residuals=True)
    tokenizer = AutoTokenizer.from_pretrained(base)
    captured = dict(zip(("base", "sft"), result.residuals, strict=True))
    for role, directory in (("base", base), ("sft", sft)):
        model = _hf_nf4(directory)
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        # The same batches as the run (batch_size 2, each as wide as its longest prompt):
        # 4-bit matmuls of other shapes round differently.
        for start in (0, 2):
            encoded = tokenizer(PROMPTS[start:start + 2], padding=True, return_tensors="pt", padding_side="right")
            real = encoded["attention_mask"].bool()
            with torch.no_grad():
                hidden = model(**encoded, output_hidden_states=True).hidden_states
            width = real.shape[1]
            for layer in range(3):
                mine = captured[role].resid_pre(layer)[start:start + 2, :width]
                assert torch.equal(mine[real], hidden[layer][real]), (role, layer, start)
            if role == "sft":
                expected = cross_model(captured["base"].resid_pre(2)[start:start + 2, :width], hidden[2])
                got = result.metrics["resid_pre"]["cosine"][2][start:start + 2, :width]
                assert torch.equal(got[real], expected.cosine[real])
    quantization = result.provenance["quantization"]["sft"]
    assert quantization["quant_type"] == "nf4" and quantization["compute_dtype"] == "float32"
    assert result.provenance["strategy"] == "nf4"


def test_nf4_on_the_cpu_quantizes_once_then_reads_the_cache(perturbed_llama, monkeypatch, tmp_path):
    from lens_compare.models import quantization
    from lens_compare.models.loading import load_config, resolve_ref

    monkeypatch.setenv("LENS_COMPARE_CACHE", str(tmp_path))
    base, _, _ = perturbed_llama
    ref = resolve_ref(str(base))
    options = LoadOptions("float32", "cpu", quantization="nf4")
    first = model_loading.load_hf_model(ref, load_config(ref), options)
    assert quantization.nf4_cache_dir(ref, "float32").is_dir()

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantized again instead of reading the cache")

    monkeypatch.setattr(quantization, "_quantize", no_quantizing)
    second = model_loading.load_hf_model(ref, load_config(ref), options)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert [p.name for p in tmp_path.joinpath("nf4").iterdir()] == [quantization.nf4_cache_dir(ref, "float32").name]
    assert not list(tmp_path.joinpath("nf4").glob(".*.tmp"))
