"""The steering check: its records against plain HF forwards with a torch hook and NumPy KL, a
planted shift that steering at its block explains whole, shards and resumed run folders, and the
options' refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lens_compare
from lens_compare import RunConfig
from lens_compare.engines import steering as steering_engine
from lens_compare.engines.store import Kind
from lens_compare.errors import ConfigError, LensCompareError
from lens_compare.models.load_options import LoadOptions
from lens_compare.pipeline.comparison import Comparison, open_run_folder, run_comparison
from lens_compare.pipeline.execution import Execution
from lens_compare.results.result import SCHEMA_VERSION
from lens_compare.results.saved import load_run
from lens_compare.run import main
from tests.fixtures.tiny_models import planted_pair

PROMPTS = ("the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding",
           "two plus two is four", "the train leaves the station at seven", "water boils at one hundred degrees")


def _cpu(schedule: str):
    options = LoadOptions("float32", "cpu")
    return lambda facts: Execution(schedule, schedule, {"base": options, "sft": options})


def _config(base, sft, **extra) -> RunConfig:
    return RunConfig(base_model=str(base), sft_model=str(sft), prompts=PROMPTS, batch_size=2, bootstrap=0,
                     logit_lens="all", steer=True, **extra)


def _layer_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _hf_logits(model, ids: list[int], layer: int | None = None, shift: torch.Tensor | None = None,
               keep: dict | None = None) -> np.ndarray:
    """One prompt's logits from a plain HF forward; ``shift`` added to decoder layer ``layer``'s
    output by a torch forward hook; ``keep`` collects every decoder layer's output."""
    handles = []
    if shift is not None:
        def add(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + shift, *output[1:])
            return output + shift
        handles.append(model.model.layers[layer].register_forward_hook(add))
    if keep is not None:
        def kept(module, args, output, index):
            keep[index] = _layer_output(output)[0].clone()  # returns None: the output stays as it is
        for index, block in enumerate(model.model.layers):
            handles.append(block.register_forward_hook(
                lambda module, args, output, index=index: kept(module, args, output, index)))
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].double().numpy()
    finally:
        for handle in handles:
            handle.remove()


def _numpy_kl_top1(sft: np.ndarray, other: np.ndarray) -> tuple[float, float]:
    """Mean KL(p_sft ‖ p) and top-1 agreement over positions 1.., in float64."""
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    ls, lo = log_softmax(sft[1:]), log_softmax(other[1:])
    return (np.exp(ls) * (ls - lo)).sum(-1).sum(), (ls.argmax(-1) == lo.argmax(-1)).sum()


def test_records_against_hf_forwards_with_a_torch_hook(perturbed_llama):
    base_dir, sft_dir, _ = perturbed_llama
    result = run_comparison(_config(base_dir, sft_dir, steer_layers=(1, 2), steer_alphas=(0.5, 1.0)),
                            preflight=_cpu("resident"))
    models = {role: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
              for role, path in (("base", base_dir), ("sft", sft_dir))}
    prompts = [list(ids) for ids in result.tokens.token_ids]
    # δ_l: the mean over positions 1.. of every prompt of (sft - base) at decoder layer l's output.
    shifts, n = {}, 0
    for ids in prompts:
        kept = {role: {} for role in models}
        for role, model in models.items():
            _hf_logits(model, ids, keep=kept[role])
        for layer in (1, 2):
            shifts[layer] = shifts.get(layer, 0) + (kept["sft"][layer][1:] - kept["base"][layer][1:]).double().sum(0)
        n += len(ids) - 1
    expected = {}
    for layer in (1, 2):
        for alpha in (0.5, 1.0):
            shift = (alpha * shifts[layer] / n).float()
            totals = np.zeros(4)
            for ids in prompts:
                sft = _hf_logits(models["sft"], ids)
                totals[:2] += _numpy_kl_top1(sft, _hf_logits(models["base"], ids))
                totals[2:] += _numpy_kl_top1(sft, _hf_logits(models["base"], ids, layer, shift))
            expected[layer, alpha] = totals / n
    assert len(result.steering_records) == 4
    for record in result.steering_records:
        kl_base, top1_base, kl, top1 = expected[record["layer"], record["alpha"]]
        assert record["n_tokens"] == n and record["prompts"] == "run"
        np.testing.assert_allclose([record["kl_base"], record["kl_steered"]], [kl_base, kl], rtol=1e-4, atol=1e-9)
        assert (record["top1_base"], record["top1_steered"]) == pytest.approx((top1_base, top1))
        assert record["fraction_kl"] == pytest.approx(1 - kl / kl_base, rel=1e-4)
    assert expected[1, 1.0][2] != expected[1, 1.0][0], "the hook really changed the base model's output"


def test_steering_at_the_planted_block_explains_the_whole_fine_tune(tmp_path):
    def fixed(model):  # one seeded vector, not a token's row
        return torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))

    base, sft = planted_pair(tmp_path, 1, fixed, size=20.0)
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:4], bootstrap=0, logit_lens="all",
                                  steer=True, steer_layers=(0, 1), check_memory=False)
    frame = result.steering()
    at = frame.set_index(["layer", "alpha"])
    assert at.loc[(1, 1.0), "kl_base"] > 1e-3, "the planted vector changes the output"
    assert at.loc[(1, 1.0), "kl_steered"] < 1e-6 * at.loc[(1, 1.0), "kl_base"]
    assert at.loc[(1, 1.0), "fraction_kl"] == pytest.approx(1.0, abs=1e-6)
    assert at.loc[(1, 1.0), "top1_steered"] == 1.0
    assert at.loc[(1, 0.5), "fraction_kl"] < 0.99 and at.loc[(1, 2.0), "fraction_kl"] < 0.99
    assert (frame.query("layer == 1")["best_alpha"] == 1.0).all()
    # Block 0 is the same in both models: δ_0 = 0 and steering there changes nothing.
    assert np.allclose(frame.query("layer == 0")["fraction_kl"], 0.0, atol=1e-6)


def _assert_same(found: list, expected: list) -> None:
    """The same records, values to float32 rounding (shards pad their batches to other widths)."""
    assert len(found) == len(expected)
    for a, b in zip(found, expected, strict=True):
        assert a["prompts"] == b["prompts"]
        numbers = {key: value for key, value in a.items() if key != "prompts"}
        assert numbers == pytest.approx({key: b[key] for key in numbers}, rel=1e-5, abs=1e-7)


def test_shards_separate_processes_and_a_resume_compute_only_what_is_missing(perturbed_llama, tmp_path,
                                                                               monkeypatch):
    base, sft, _ = perturbed_llama
    one = run_comparison(_config(base, sft), preflight=_cpu("resident")).steering_records
    assert [r["layer"] for r in one] == [0, 0, 0, 1, 1, 1, 2, 2, 2], "default: the verdict's spread"
    config = _config(base, sft, shard_size=2)
    sharded = run_comparison(config, preflight=_cpu("sequential")).steering_records
    _assert_same(sharded, one)

    calls = []
    real_shard_steering = steering_engine.shard_steering
    monkeypatch.setattr(steering_engine, "shard_steering",
                        lambda job, shard, *args: calls.append(shard) or real_shard_steering(job, shard, *args))

    def comparison() -> Comparison:
        return Comparison(config, preflight=_cpu("resident"), held_in_memory=False)

    driver = comparison()
    folder = open_run_folder(driver, tmp_path)
    first = comparison()
    first.run_shards((0, 2), open_run_folder(first, tmp_path))
    assert calls == [] and driver.pending(folder) == [1], "δ is not known before shard 1's sums are in"
    second = comparison()
    second.run_shard(1, open_run_folder(second, tmp_path))
    assert calls == [0, 1, 2] and driver.pending(folder) == []
    _assert_same(driver.assemble(folder).steering_records, one)

    folder.drop(Kind.STEERING, shard=1)
    assert driver.pending(folder) == [1]
    with pytest.raises(RuntimeError, match="steering check's sums"):
        driver.assemble(folder)
    calls.clear()
    resumed = comparison()
    resumed.run(open_run_folder(resumed, tmp_path))
    assert calls == [1], "a resumed run computes only the missing shard's steering"
    assert driver.pending(folder) == []


def test_flags_json_saved_runs_and_refusals(perturbed_llama, tmp_path, capsys):
    base, sft, _ = perturbed_llama
    assert main(["--base", str(base), "--sft", str(sft), *(a for p in PROMPTS[:3] for a in ("--prompt", p)),
                 "--logit-lens", "all", "--bootstrap", "0", "--steer", "--steer-layers", "1",
                 "--steer-alphas", "1,2", "--plots", "--out", str(tmp_path), "-q"]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    path = next(p for p in written if p.suffix == ".json")
    document = json.loads(path.read_text())
    assert document["schema_version"] == SCHEMA_VERSION
    assert [(r["layer"], r["alpha"]) for r in document["steering"]] == [(1, 1.0), (1, 2.0)]
    assert list(load_run(path).steering()["alpha"]) == [1.0, 2.0]
    figure = next(p for p in written if p.name.endswith(".steering.png"))
    assert figure.stat().st_size > 10_000

    old = json.loads(json.dumps(document))
    old["schema_version"] = 5
    del old["steering"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(LensCompareError, match="no steering check"):
        load_run(tmp_path / "old.json").steering()

    off = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:2], bootstrap=0, logit_lens="all",
                               check_memory=False)
    assert off.to_dict()["steering"] is None, "off by default"

    refusals = [
        (["--strategy", "stream"], "stream strategy"),
        (["--steer-layers", "7"], "not captured layers"),
        (["--no-difference-lens"], "difference lens"),
    ]
    for extra, message in refusals:
        capsys.readouterr()
        code = main(["--base", str(base), "--sft", str(sft), "--prompt", "hello world", "--logit-lens", "all",
                     "--steer", *extra, "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, (extra, err)
        assert not (tmp_path / "refused" / "runs").exists()
    with pytest.raises(ConfigError, match="steer_alphas"):
        RunConfig.from_dict({"steer": True, "steer_alphas": []})
    with pytest.raises(ConfigError, match="steer"):
        RunConfig.from_dict({"steer": True, "logit_lens": False})
