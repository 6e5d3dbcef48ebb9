"""The difference lens: its readings against a NumPy reference from the saved residuals, a planted
direction found from the block that adds it on, every engine and sharding giving the same readings,
shards run by separate comparisons and a run killed before its readings then resumed (readings and
top positions), a sweep's prefixes, the JSON, DataFrame and figure, and the option's refusals."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lens_compare
from lens_compare import RunConfig
from lens_compare.analyses.difference_lens import READINGS, class_masks
from lens_compare.engines.store import Kind
from lens_compare.errors import ConfigError, LensCompareError
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.tokens import readable_tokens
from lens_compare.pipeline.comparison import Comparison, open_run_folder, run_comparison
from lens_compare.pipeline.execution import Execution
from lens_compare.results.saved import load_run
from lens_compare.run import main
from tests.fixtures.ranks import ranked_difference, ranked_positions_difference
from tests.fixtures.tiny_models import build_tiny_model, planted_pair
from tests.fixtures.token_classes import numpy_masks

PROMPTS = ("the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding",
           "two plus two is four", "the train leaves the station at seven", "water boils at one hundred degrees")


def _cpu(schedule: str):
    options = LoadOptions("float32", "cpu")
    return lambda facts: Execution(schedule, schedule, {"base": options, "sft": options})


def test_token_classes():
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, 6:] = False
    plain = class_masks(real, None, 3)
    assert set(plain) == {"rest", "first_content"}, "no template class without a chat template"
    assert plain["rest"].tolist() == [[False] + [True] * 8, [False] + [True] * 5 + [False] * 3]
    assert plain["first_content"].nonzero().tolist() == [[0, 1], [0, 2], [0, 3], [1, 1], [1, 2], [1, 3]]
    # With a chat template: content flags (position 0 never counts).
    content = ((True, False, False, True, True, False, True, True, True), (False, False, True, False, True, True))
    classes = class_masks(real, content, 2)
    assert classes["first_content"].nonzero().tolist() == [[0, 3], [0, 4], [1, 2], [1, 4]]
    assert classes["template"].nonzero().tolist() == [[0, 1], [0, 2], [0, 5], [1, 1], [1, 3]]
    assert set(class_masks(real, content, 0)) == {"rest", "template"}, "first 0: no first_content class"


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory) -> dict[str, Path]:
    """An SFT stand-in per family that differs everywhere, its final norm and head included."""
    root = tmp_path_factory.mktemp("difference_other")
    return {family: build_tiny_model(family, root / family, seed=1) for family in ("llama", "gpt2")}


def _numpy_norm(hf_model, family: str):
    """The model's final norm in float64 NumPy, written from its definition."""
    if family == "gpt2":
        norm = hf_model.transformer.ln_f
        weight, bias, eps = norm.weight.detach().double().numpy(), norm.bias.detach().double().numpy(), norm.eps
        return lambda x: ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)) * weight + bias
    norm = hf_model.model.norm
    weight, eps = norm.weight.detach().double().numpy(), hf_model.config.rms_norm_eps
    return lambda x: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_readings_against_numpy_from_the_saved_residuals(family, tiny_model_dirs, other_seed):
    base_dir, sft_dir = tiny_model_dirs[family], other_seed[family]
    result = lens_compare.compare(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:4], bootstrap=0,
                                  logit_lens="all", chat_template="sft", difference_lens_top=4,
                                  difference_lens_first=3, keep_residuals=True, check_memory=False)
    assert result.provenance["difference_lens"]["on"] and result.tokens.content is not None
    models = {role: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
              for role, path in (("base", base_dir), ("sft", sft_dir))}
    norms = {role: _numpy_norm(model, family) for role, model in models.items()}
    unembed = {role: model.get_output_embeddings().weight.double().detach().numpy() for role, model in models.items()}
    states = {role: (r.states, r.values.double().numpy()) for role, r in zip(("base", "sft"), result.residuals,
                                                                            strict=True)}
    masks = numpy_masks(result, 3)
    tokenizers = {role: AutoTokenizer.from_pretrained(str(path)) for role, path in (("base", base_dir),
                                                                                     ("sft", sft_dir))}
    records = {(r["layer"], r["positions"], r["reading"]): r for r in result.difference_lens_records}
    assert {key[1] for key in records} == {"rest", "first_content", "template"}
    assert len(records) == len(result.layers) * 3 * len(READINGS)
    for layer in result.layers:
        resid = {role: values[list(found).index(layer + 1)] for role, (found, values) in states.items()}
        for positions, mask in masks.items():
            delta = (resid["sft"][mask] - resid["base"][mask]).mean(axis=0)
            means = {role: resid[role][mask].mean(axis=0) for role in resid}
            expected = {
                "base": unembed["base"] @ norms["base"](delta),
                "sft": unembed["sft"] @ norms["sft"](delta),
                "logit_difference": unembed["sft"] @ norms["sft"](means["sft"])
                - unembed["base"] @ norms["base"](means["base"]),
            }
            for reading, values in expected.items():
                record = records[layer, positions, reading]
                for direction, order in (("promoted", np.argsort(-values)), ("suppressed", np.argsort(values))):
                    found = record[direction]
                    assert [item["token_id"] for item in found] == order[:4].tolist(), (layer, positions, reading)
                    np.testing.assert_allclose([item["logit"] for item in found], values[order[:4]], rtol=1e-4,
                                               atol=1e-5)
                    tokenizer = tokenizers["sft" if reading == "sft" else "base"]
                    assert [item["token"] for item in found] == list(readable_tokens(tokenizer, order[:4].tolist()))


def test_a_planted_direction_is_the_top_promoted_token_from_its_block_on(tmp_path):
    block, token = 1, 200
    # The SFT copy's block adds a multiple of token 200's unembedding row.
    base, sft = planted_pair(tmp_path, block, lambda model: model.get_output_embeddings().weight[token], size=100.0)
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:3], bootstrap=0, logit_lens="all",
                                  check_memory=False)
    frame = result.difference_lens()
    top = frame.query("direction == 'promoted' and rank == 1 and reading in ('base', 'sft')")
    assert set(top["positions"]) == {"rest", "first_content"}
    assert (top["layer"] >= block).all(), "before the block both models' states agree: nothing is listed"
    assert len(top) == 2 * 2 * (4 - block), "every layer from the block on, both classes, both heads' readings"
    assert (top["token_id"] == token).all(), top
    for record in result.difference_lens_records:
        if record["layer"] < block:
            assert record["promoted"] == [] and record["suppressed"] == []


@pytest.fixture(scope="module")
def reference_result(perturbed_llama):
    base, sft, _ = perturbed_llama
    return run_comparison(_config(base, sft), preflight=_cpu("resident"))


@pytest.fixture(scope="module")
def reference(reference_result) -> list:
    return reference_result.difference_lens_records


@pytest.fixture(scope="module")
def reference_positions(reference_result) -> list:
    return reference_result.difference_positions_records


def _config(base, sft, **extra) -> RunConfig:
    return RunConfig(base_model=str(base), sft_model=str(sft), prompts=PROMPTS, batch_size=2, bootstrap=0,
                     logit_lens="all", **extra)


def _assert_same_readings(found: list, expected: list) -> None:
    """The same records, values to float32 rounding (engines sum in other orders), the same ids but
    where values tie within it."""
    assert [(r["layer"], r["positions"], r["reading"]) for r in found] == \
        [(r["layer"], r["positions"], r["reading"]) for r in expected]
    for a, b in zip(found, expected, strict=True):
        for direction in ("promoted", "suppressed"):
            assert ranked_difference(b[direction], a[direction], 1e-5, 1e-6, direction) is None
            assert len(a[direction]) == 10 or not a[direction]


def test_three_shards_read_exactly_what_one_does(perturbed_llama, reference):
    base, sft, _ = perturbed_llama
    sharded = run_comparison(_config(base, sft, shard_size=2), preflight=_cpu("resident"))
    assert sharded.provenance["shards"]["count"] == 3
    assert sharded.difference_lens_records == reference
    assert reference[0]["layer"] == 0 and not reference[0]["promoted"], "block 0 is the same in both models"
    assert all(r["promoted"] for r in reference if r["layer"] >= 1)


@pytest.mark.parametrize("schedule,extra", [("sequential", {}), ("stream", {}), ("stream", {"shard_size": 4}),
                                            ("resident", {"layers": (1, 2)})])
def test_every_engine_gives_the_resident_readings(perturbed_llama, reference, schedule, extra):
    base, sft, _ = perturbed_llama
    found = run_comparison(_config(base, sft, **extra), preflight=_cpu(schedule)).difference_lens_records
    expected = [r for r in reference if r["layer"] in extra.get("layers", (0, 1, 2))]
    _assert_same_readings(found, expected)


class Killed(Exception):
    """The process dies here (a test's stand-in for SIGKILL)."""


def _killed_before_the_readings(monkeypatch, error: type[BaseException] = Killed) -> list[int]:
    """Make the next readings die after ranking the positions, before anything is stored; the
    returned list counts the tries."""
    from lens_compare.engines import difference

    tries = []

    def die(*args, **kwargs):
        tries.append(1)
        raise error

    monkeypatch.setattr(difference, "read_difference", die)
    return tries


@pytest.mark.parametrize("schedule", ["resident", "sequential", "stream"])
def test_shards_of_separate_comparisons_and_a_resume_without_readings(perturbed_llama, reference, reference_positions,
                                                                       schedule, tmp_path, monkeypatch):
    """What a sweep's workers do: each its shards into one run folder; the one that finishes the last
    shard computes the readings. Killed there, between its sums and the readings, the run folder holds
    every shard and their spill but not the readings: it lists its last shard as pending, and a
    resumed run computes the readings and top positions alone, from the folder, then drops the spill."""
    base, sft, _ = perturbed_llama
    config = _config(base, sft, shard_size=2)

    def comparison() -> Comparison:
        return Comparison(config, preflight=_cpu(schedule), held_in_memory=False)

    driver = comparison()
    folder = open_run_folder(driver, tmp_path)
    first = comparison()
    first.run_shards((0, 2), open_run_folder(first, tmp_path))
    assert driver.pending(folder) == [1] and not folder.has(Kind.DIFFERENCE_LENS)
    assert {(key.shard, key.state) for key in folder.keys(Kind.DIFFERENCE_UNITS)} == {
        (shard, state) for shard in (0, 2) for state in (1, 2, 3)}, "each finished shard's spill, every lens state"
    tries = _killed_before_the_readings(monkeypatch)
    second = comparison()
    with pytest.raises(Killed):
        second.run_shard(1, open_run_folder(second, tmp_path))
    assert tries == [1], "the process that finished the last shard computed the readings"
    monkeypatch.undo()
    assert driver.pending(folder) == [2], "every shard is in: the last one stands for the readings"
    assert len(folder.keys(Kind.DIFFERENCE_UNITS)) == 3 * 3 and not folder.has(Kind.DIFFERENCE_LENS)
    with pytest.raises(RuntimeError, match="not the difference lens's readings"):
        driver.assemble(folder)
    resumed = comparison()
    resumed.run(open_run_folder(resumed, tmp_path))
    assert driver.pending(folder) == [] and not folder.keys(Kind.DIFFERENCE_UNITS)
    assert not (folder.path / "difference_units").exists()
    result = driver.assemble(folder)
    _assert_same_readings(result.difference_lens_records, reference)
    assert ranked_positions_difference(reference_positions, result.difference_positions_records, 1e-4, 1e-5) is None


def test_the_cli_resumes_a_run_folder_that_lacks_only_the_readings(perturbed_llama, tmp_path, capsys, caplog,
                                                                    monkeypatch):
    import logging

    base, sft, _ = perturbed_llama
    args = ["--base", str(base), "--sft", str(sft), *(a for p in PROMPTS[:4] for a in ("--prompt", p)),
            "--shard-size", "2", "--bootstrap", "0"]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    whole = json.loads(next(Path(line) for line in capsys.readouterr().out.split() if line.endswith(".json"))
                       .read_text())
    _killed_before_the_readings(monkeypatch, KeyboardInterrupt)  # after the last shard's sums, before the readings
    assert main([*args, "--out", str(tmp_path)]) == 130
    monkeypatch.undo()
    [folder] = (tmp_path / "runs").iterdir()
    assert not (folder / "difference_lens.json").exists() and (folder / "difference_units").is_dir()
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        assert main([*args, "--out", str(tmp_path)]) == 0
    assert "2 of 2 shard(s) already finished; all finished but the difference lens's readings" in caplog.text
    resumed = json.loads(next(Path(line) for line in capsys.readouterr().out.split() if line.endswith(".json"))
                         .read_text())
    assert resumed["difference_lens"] == whole["difference_lens"] and whole["difference_lens"]
    assert resumed["difference_positions"] == whole["difference_positions"] and whole["difference_positions"]
    assert not (folder / "difference_units").exists()


@pytest.mark.parametrize("schedule", ["resident", "stream"])
def test_a_capture_reads_the_prefixes_a_sweep_serves_from_it(perturbed_llama, tmp_path, schedule):
    """A sweep reads a shorter length off a longer capture (``PrefixView``); the difference lens's
    sums cover whole prompts, so the capture also sums and reads each asked-for prefix."""
    from lens_compare.sweeps.prefix import PrefixView

    base, sft, _ = perturbed_llama
    config = _config(base, sft, tokens=12, filler_text=" and so on", shard_size=2)
    capture = Comparison(config.replace(prefix_lengths=[6]), preflight=_cpu(schedule), held_in_memory=False)
    folder = open_run_folder(capture, tmp_path)
    capture.run(folder)
    assert set(folder.get(Kind.DIFFERENCE_LENS)["prefixes"]) == {"6"}
    # As the sweep reads a length off a capture: without a steering check of its own (sweeps/prefix.py).
    short = Comparison(config.replace(tokens=6, steer=False), preflight=_cpu("resident"), held_in_memory=False)
    read_off = short.assemble(PrefixView(folder, 6, short.plan().run.tokenized.token_ids))
    separate = run_comparison(config.replace(tokens=6), preflight=_cpu("resident"))
    _assert_same_readings(read_off.difference_lens_records, separate.difference_lens_records)
    # The top positions too: over the prefix's tokens, against the prefix's own mean shift.
    assert max(r["position"] for r in read_off.difference_positions_records) < 6
    assert ranked_positions_difference(separate.difference_positions_records, read_off.difference_positions_records,
                                       1e-4, 1e-5) is None
    # A length the capture was not asked for has no readings: refused, not read off the whole prompts.
    other = Comparison(config.replace(tokens=8, steer=False), preflight=_cpu("resident"), held_in_memory=False)
    view = PrefixView(folder, 8, other.plan().run.tokenized.token_ids)
    assert other.pending(view) == [2]
    with pytest.raises(RuntimeError, match="difference lens's readings"):
        other.assemble(view)
    with pytest.raises(ConfigError, match="prefix_lengths"):
        RunConfig.from_dict({"prefix_lengths": [6]})


def test_vocabularies_of_different_sizes_read_their_shared_ids(perturbed_llama, tmp_path):
    base, perturbed, _ = perturbed_llama
    model = AutoModelForCausalLM.from_pretrained(str(perturbed), dtype=torch.float32)
    shared = model.config.vocab_size
    model.resize_token_embeddings(shared + 3)  # as an SFT recipe that adds chat tokens does
    sft = tmp_path / "resized"
    shutil.copytree(perturbed, sft)
    model.save_pretrained(str(sft))
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:2], bootstrap=0, logit_lens="all",
                                  difference_lens_top=shared, check_memory=False)
    assert result.provenance["logit_lens"]["vocabulary"]["shared"] == shared
    listed = [item["token_id"] for r in result.difference_lens_records for item in r["promoted"]]
    assert listed and max(listed) < shared and len(result.difference_lens_records[-1]["promoted"]) == shared


def test_json_dataframe_figure_and_saved_runs(perturbed_llama, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from lens_compare import plots

    base, sft, _ = perturbed_llama
    assert main(["--base", str(base), "--sft", str(sft), *(a for p in PROMPTS[:3] for a in ("--prompt", p)),
                 "--logit-lens", "all", "--difference-lens-top", "3", "--bootstrap", "0", "--plots",
                 "--out", str(tmp_path), "-q"]) == 0
    written = [Path(line) for line in capsys.readouterr().out.split()]
    document = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    assert document["schema_version"] == 7
    provenance = document["provenance"]["difference_lens"]
    assert provenance["on"] and provenance["top"] == 3 and provenance["layers"] == [0, 1, 2]
    assert set(provenance["n_tokens"]) == {"rest", "first_content"}
    record = next(r for r in document["difference_lens"] if r["layer"] == 2)
    assert set(record) == {"layer", "positions", "reading", "promoted", "suppressed"}
    assert set(record["promoted"][0]) == {"token_id", "token", "logit"} and len(record["suppressed"]) == 3
    assert record["promoted"][0]["logit"] > 0 > record["suppressed"][0]["logit"]
    figure = next(p for p in written if p.name.endswith(".difference_lens.png"))
    assert figure.stat().st_size > 10_000

    saved = load_run(next(p for p in written if p.suffix == ".json"))
    frame = saved.difference_lens()
    assert list(frame.columns) == ["layer", "positions", "reading", "direction", "rank", "token_id", "token", "logit"]
    assert len(frame) == 2 * 2 * 3 * 3 * 2, "layers 1 and 2 (0 is unchanged), 2 classes, 3 readings, 3 ranks, 2 ways"
    assert (record["positions"], record["reading"]) == ("rest", "base")
    firsts = frame.query("layer == 2 and positions == 'rest' and reading == 'base' and rank == 1")
    assert firsts["logit"].tolist() == [record["promoted"][0]["logit"], record["suppressed"][0]["logit"]]
    plots.difference_lens_table(saved, reading="logit_difference", positions="first_content")
    with pytest.raises(LensCompareError, match="covers"):
        plots.difference_lens_table(saved, positions="template")

    # A run saved before the difference lens (schema 4) reads back; its difference_lens() says why it has none.
    old = json.loads(json.dumps(document))
    old["schema_version"] = 4
    del old["difference_lens"], old["provenance"]["difference_lens"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    with pytest.raises(LensCompareError, match="saved before lens_compare had a difference lens"):
        load_run(path).difference_lens()


def test_the_option_off_with_the_logit_lens_and_its_refusals(perturbed_llama, tmp_path, capsys):
    base, sft, _ = perturbed_llama
    off = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:2], bootstrap=0, logit_lens="all",
                               difference_lens=False, check_memory=False)
    assert off.to_dict()["difference_lens"] is None
    assert off.provenance["difference_lens"]["reason"] == "--no-difference-lens"
    with pytest.raises(LensCompareError, match="--no-difference-lens"):
        off.difference_lens()
    quiet = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:2], bootstrap=0, logit_lens="off",
                                 check_memory=False)
    assert not quiet.provenance["difference_lens"]["on"]
    assert "the logit lens is off" in quiet.provenance["difference_lens"]["reason"]
    # Asked for where the logit lens is off: refused before anything loads, in one line.
    capsys.readouterr()
    code = main(["--base", str(base), "--sft", str(sft), "--prompt", "hello", "--no-logit-lens", "--difference-lens",
                 "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "difference lens" in err and "logit lens" in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="difference_lens"):
        RunConfig.from_dict({"difference_lens": True, "logit_lens": False})
    with pytest.raises(ConfigError, match="difference_lens_top: must be >= 1"):
        RunConfig.from_dict({"difference_lens_top": 0})
    assert RunConfig.from_dict({"difference_lens": False}).difference_lens is False
