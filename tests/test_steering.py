"""The steering check: its records against plain HF forwards with a torch hook and NumPy KL, a
planted shift that steering at its block explains whole, shards and resumed run folders, the
options' refusals, and when auto turns it on (the planner's seconds for it against the run's)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import lens_compare
from lens_compare import RunConfig
from lens_compare.engines import loaded as loaded_module
from lens_compare.engines import steering as steering_engine
from lens_compare.engines.store import Kind
from lens_compare.errors import ConfigError, LensCompareError
from lens_compare.hardware.steering import decide
from lens_compare.models.load_options import LoadOptions
from lens_compare.pipeline.comparison import Comparison, open_run_folder, run_comparison
from lens_compare.pipeline.execution import Execution
from lens_compare.pipeline.preflight import memory_preflight
from lens_compare.plots import steering_curves
from lens_compare.results.result import SCHEMA_VERSION
from lens_compare.results.saved import load_run
from lens_compare.results.verdict import verdict
from lens_compare.run import main
from tests.fixtures.tiny_models import planted_pair

PROMPTS = ("the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding",
           "two plus two is four", "the train leaves the station at seven", "water boils at one hundred degrees")


def _cpu(schedule: str):
    options = LoadOptions("float32", "cpu")
    return lambda facts: Execution(schedule, schedule, {"base": options, "sft": options})


def _config(base, sft, **extra) -> RunConfig:
    return RunConfig(base_model=str(base), sft_model=str(sft), prompts=PROMPTS, batch_size=2, bootstrap=0,
                     **{"logit_lens": "all", "steer": True, **extra})


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


def _hf_models(base_dir, sft_dir) -> dict:
    return {role: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager")
            for role, path in (("base", base_dir), ("sft", sft_dir))}


def _hf_expected(models: dict, run_prompts: list, measured: list, layers: tuple, alphas: tuple) -> tuple[dict, int]:
    """Per (layer, α): mean KL(p_sft ‖ p_base), top-1 agreement, and the same steered, over positions
    1.. of ``measured``, with δ_l the mean over positions 1.. of ``run_prompts`` of (sft - base) at
    decoder layer l's output; and the token count."""
    shifts, n = {}, 0
    for ids in run_prompts:
        kept = {role: {} for role in models}
        for role, model in models.items():
            _hf_logits(model, ids, keep=kept[role])
        for layer in layers:
            shifts[layer] = shifts.get(layer, 0) + (kept["sft"][layer][1:] - kept["base"][layer][1:]).double().sum(0)
        n += len(ids) - 1
    count = sum(len(ids) - 1 for ids in measured)
    expected = {}
    for layer in layers:
        for alpha in alphas:
            shift = (alpha * shifts[layer] / n).float()
            totals = np.zeros(4)
            for ids in measured:
                sft = _hf_logits(models["sft"], ids)
                totals[:2] += _numpy_kl_top1(sft, _hf_logits(models["base"], ids))
                totals[2:] += _numpy_kl_top1(sft, _hf_logits(models["base"], ids, layer, shift))
            expected[layer, alpha] = totals / count
    return expected, count


def _assert_expected(records: list, expected: dict, count: int, prompts: str) -> None:
    assert len(records) == len(expected)
    for record in records:
        kl_base, top1_base, kl, top1 = expected[record["layer"], record["alpha"]]
        assert record["n_tokens"] == count and record["prompts"] == prompts
        np.testing.assert_allclose([record["kl_base"], record["kl_steered"]], [kl_base, kl], rtol=1e-4, atol=1e-9)
        assert (record["top1_base"], record["top1_steered"]) == pytest.approx((top1_base, top1))
        assert record["fraction_kl"] == pytest.approx(1 - kl / kl_base, rel=1e-4)


def test_records_against_hf_forwards_with_a_torch_hook(perturbed_llama):
    base_dir, sft_dir, _ = perturbed_llama
    result = run_comparison(_config(base_dir, sft_dir, steer_layers=(1, 2), steer_alphas=(0.5, 1.0)),
                            preflight=_cpu("resident"))
    prompts = [list(ids) for ids in result.tokens.token_ids]
    expected, count = _hf_expected(_hf_models(base_dir, sft_dir), prompts, prompts, (1, 2), (0.5, 1.0))
    _assert_expected(result.steering_records, expected, count, "run")
    assert expected[1, 1.0][2] != expected[1, 1.0][0], "the hook really changed the base model's output"


HELD_OUT = ("a cat sat on the mat by the door", "seven eight nine ten eleven twelve", "ok")


def test_held_out_prompts_against_hf_forwards_and_the_models_each_schedule_loads(perturbed_llama, tmp_path,
                                                                                  monkeypatch):
    base_dir, sft_dir, _ = perturbed_llama
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n".join(HELD_OUT) + "\n")
    opened, alive, most = [], [], []
    real_open = loaded_module.open_model

    def counting(job, side):
        model = real_open(job, side)
        opened.append(side.role)
        alive.append(model)
        most.append(len(alive))
        real_close = model.close
        model.close = lambda: alive.remove(model) or real_close()
        return model

    monkeypatch.setattr(loaded_module, "open_model", counting)
    config = _config(base_dir, sft_dir, steer_layers=(1, 2), steer_alphas=(1.0, 2.0), steer_prompts=str(held_out),
                     shard_size=4)
    found = {}
    for schedule in ("resident", "sequential"):
        opened.clear()
        most.clear()
        result = run_comparison(config, preflight=_cpu(schedule))
        found[schedule] = result
        if schedule == "resident":
            assert opened == ["base", "sft"] and max(most) == 2, "the check reuses the two models loaded"
        else:
            assert opened == ["base", "sft", "base"] and max(most) == 1, \
                "sequential: the base model once more for the check, never both models at once"
    result = found["resident"]
    assert result.provenance.steering["held_out_prompts"] == 3
    frame = result.steering()
    assert list(frame["prompts"].unique()) == ["run", "held_out"]
    _assert_same(found["sequential"].steering_records, result.steering_records)

    models = _hf_models(base_dir, sft_dir)
    tokenizer = result.tokens
    run_prompts = [list(ids) for ids in tokenizer.token_ids]
    from transformers import AutoTokenizer
    held_ids = [AutoTokenizer.from_pretrained(str(base_dir))(text)["input_ids"] for text in HELD_OUT]
    expected, count = _hf_expected(models, run_prompts, held_ids, (1, 2), (1.0, 2.0))
    _assert_expected([r for r in result.steering_records if r["prompts"] == "held_out"], expected, count,
                     "held_out")
    assert not any(path.name.startswith("target") for path in tmp_path.rglob("*.safetensors"))

    comparison = Comparison(config, preflight=_cpu("resident"), held_in_memory=False)
    folder = open_run_folder(comparison, tmp_path / "resumed")
    comparison.run(folder)
    folder.drop(Kind.STEERING, shard=2)  # the held-out prompts' unit, after shards 0 and 1
    assert comparison.pending(folder) == [1], "a shard that exists, whose call computes the held-out unit"
    comparison.run_shard(1, folder)
    assert comparison.pending(folder) == [] and folder.has(Kind.STEERING, shard=2)

    figure = steering_curves(result)
    curves = [line for line in figure.axes[0].get_lines() if line.get_label()[0] == "α"]
    drawn = {line.get_label(): line.get_linestyle() for line in curves}
    assert drawn == {"α = 1, run": "-", "α = 1, held-out": "--", "α = 2, run": "-", "α = 2, held-out": "--"}
    assert all(len(line.get_xdata()) == 2 for line in curves), \
        "one point per steered layer on each line: the two prompt sets are not joined"

    lines = verdict(result).splitlines()
    best = max((r for r in result.steering_records if r["prompts"] == "run"), key=lambda r: r["fraction_kl"])
    held = next(r for r in result.steering_records
                if r["prompts"] == "held_out" and (r["layer"], r["alpha"]) == (best["layer"], best["alpha"]))
    at = next(i for i, line in enumerate(lines) if line.startswith("steering check:"))
    assert f"after layer {best['layer']} closes {best['fraction_kl']:.0%}" in lines[at]
    assert lines[at + 1].startswith("  on the 3 held-out prompts: ") and f"{held['fraction_kl']:.0%}" in lines[at + 1]
    assert any(line.startswith("what the mean shift says (difference lens, layer 2, base head): promotes ")
               for line in lines)


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
    real_unit_sums = steering_engine.unit_sums
    monkeypatch.setattr(steering_engine, "unit_sums",
                        lambda job, unit, *args: calls.append(unit) or real_unit_sums(job, unit, *args))

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
    captured = capsys.readouterr()
    assert "%|" not in captured.err, "-q: no progress bar, not even the libraries' weight loads"
    written = [Path(line) for line in captured.out.split()]
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
                               steer=False, check_memory=False)
    assert off.to_dict()["steering"] is None, "--no-steer"
    assert off.provenance["steering"] == {"requested": False, "on": False, "reason": "--no-steer", "layers": [],
                                          "alphas": [], "positions": None, "held_out_prompts": 0, "estimate": None}

    refusals = [
        (["--steer-layers", "7"], "not captured layers"),
        (["--no-difference-lens"], "difference lens"),
        (["--steer-prompts", str(tmp_path / "absent.txt")], "does not exist"),
    ]
    for extra, message in refusals:
        capsys.readouterr()
        code = main(["--base", str(base), "--sft", str(sft), "--prompt", "hello world", "--logit-lens", "all",
                     "--steer", *extra, "--out", str(tmp_path / "refused")])
        err = capsys.readouterr().err
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, (extra, err)
        assert not (tmp_path / "refused" / "runs").exists()
    with pytest.raises(ConfigError, match="steer_prompts"):
        RunConfig.from_dict({"steer": False, "steer_prompts": "held_out.txt"})
    with pytest.raises(ConfigError, match="steer_alphas"):
        RunConfig.from_dict({"steer": True, "steer_alphas": []})
    with pytest.raises(ConfigError, match="steer"):
        RunConfig.from_dict({"steer": True, "logit_lens": False})


def test_auto_is_on_where_the_check_costs_less_than_the_run(perturbed_llama, caplog):
    """Tiny models: loading dominates the run, and the check's forwards cost next to nothing beside it."""
    base, sft, _ = perturbed_llama
    with caplog.at_level("INFO", logger="lens_compare"):
        result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:3], bootstrap=0,
                                      logit_lens="all")
    steering = result.provenance["steering"]
    assert steering["requested"] is None and steering["on"] and steering["layers"] == [0, 1, 2]
    assert steering["alphas"] == [0.5, 1.0, 2.0] and steering["positions"] == "rest"
    estimate = steering["estimate"]
    assert 0 < estimate["steering"] <= estimate["run"], estimate
    assert result.provenance["schedule"] == "resident"
    assert [(r["layer"], r["alpha"]) for r in result.steering_records][:2] == [(0, 0.5), (0, 1.0)]
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("steering check"))
    assert line.startswith("steering check on at layers 0, 1, 2 x 3 alpha(s) (auto: the check takes ~") and \
        "at most the core run's" in line
    # Streamed, auto leaves it off and says why (nothing loads: the plan alone).
    streamed = Comparison(_config(base, sft, steer=None, strategy="stream"), preflight=memory_preflight).plan()
    assert not streamed.run.steering.on and streamed.run.steering.reason.startswith("stream:")
    assert streamed.job.steering is None
    # Without the logit lens there is no difference lens, so no δ to steer by.
    plain = Comparison(_config(base, sft, steer=None, logit_lens="off"), preflight=memory_preflight).plan()
    assert not plain.run.steering.on and plain.run.steering.reason.startswith("the difference lens is off")
    assert not decide(None, (0,), (1.0,), None).on, "no estimate for the family: off"
    assert decide(None, (0,), (1.0,), None).reason.startswith("no time estimate")


def test_auto_is_off_for_smollm2_at_250_tokens_and_an_explicit_steer_still_runs_it(smollm2_safetensors):
    """SmolLM2-135M, 16 prompts of 250 tokens on the CPU: 5 layers x 3 multiples make 17 forwards with
    their heads (~231 s), several times the core run (~33 s). Planned only: nothing loads."""
    def plan(**option):
        config = RunConfig(base_model=str(smollm2_safetensors), sft_model=str(smollm2_safetensors),
                           prompts=tuple(f"prompt {i}" for i in range(16)), tokens=250,
                           filler_text="The history of science", device="cpu", **option)
        return Comparison(config, preflight=memory_preflight).plan()

    auto = plan()
    steering = auto.run.steering
    assert auto.execution.schedule == "resident" and auto.run.logit_lens.mode == "final"
    assert not steering.on and auto.job.steering is None
    assert steering.estimate["steering"] == pytest.approx(231, rel=0.02)
    assert steering.estimate["run"] == pytest.approx(32.5, rel=0.05)
    assert "--steer runs it" in steering.reason
    asked = plan(steer=True).run.steering
    assert asked.on and asked.requested and asked.layers == (0, 7, 14, 22, 29) and asked.estimate == steering.estimate
    assert not plan(steer=False).run.steering.on
