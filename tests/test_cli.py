"""The CLI end to end on tiny checkpoints, and every bad input's clear, early error."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

import lens_compare
from lens_compare.metrics.residual import cross_model
from lens_compare.run import main
from lens_compare.util.outputs import write_atomically
from tests.fixtures.fake_cuda import H100, fake_cuda


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in an empty directory so no repository config is picked up."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEV_MODE", raising=False)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def outputs(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*")) if directory.exists() else []


def test_run_writes_json_tables_and_residuals(tiny_model_dirs, tmp_path, capsys):
    model = str(tiny_model_dirs["qwen2"])
    code, out, err = run_cli(capsys, "--base", model, "--sft", model, "--prompt", "the quick brown fox",
                             "--prompt", "hello", "--out", "res", "--parquet", "--csv", "--save-residuals", "-q")
    assert code == 0, err
    written = [Path(line) for line in out.split()]
    suffixes = sorted("".join(p.suffixes[-2:]) if ".tokens" in p.name or ".summary" in p.name else p.suffix
                      for p in written)
    assert suffixes == sorted([".json", ".safetensors", ".tokens.parquet", ".summary.parquet",
                               ".tokens.csv", ".summary.csv"])
    assert not [p for p in outputs(tmp_path / "res") if p.name.startswith(".")]
    document = json.loads(next(p for p in written if p.suffix == ".json").read_text())
    tensors = load_file(str(next(p for p in written if p.suffix == ".safetensors")))
    assert tensors["base/blocks.0.hook_resid_pre"].shape[:2] == tensors["token_ids"].shape
    assert torch.equal(tensors["base/blocks.0.hook_resid_post"], tensors["base/blocks.1.hook_resid_pre"])
    # recompute one aggregate from the saved residuals, independently of the pipeline
    mask = tensors["attention_mask"].bool().clone()
    mask[:, 0] = False
    cm = cross_model(tensors["base/blocks.2.hook_resid_post"], tensors["sft/blocks.2.hook_resid_post"])
    assert document["resid_post"][2]["base_norm"]["mean"] == pytest.approx(cm.base_norm[mask].double().mean().item())
    assert document["provenance"]["token_ids"] == [
        row[: int(m.sum())] for row, m in zip(tensors["token_ids"].tolist(), tensors["attention_mask"], strict=True)
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pair", "lama8b"], "unknown pair 'lama8b'. Did you mean 'llama8b'"),
        (["--base", "/nonexistent/model.gguf", "--sft", "/nonexistent/model.gguf"], "does not exist"),
        (["--base", "./missing_dir", "--sft", "./missing_dir"], "no such file or directory"),
        (["--pair", "smollm2-sanity", "--prompts-file", "nope.txt"], "prompts file 'nope.txt' does not exist"),
        (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
        (["--pair", "llama8b", "--layers", "1,x"], "expected comma-separated integers"),
        (["--base", "notamodel.txt", "--sft", "notamodel.txt"], "'notamodel.txt' is a file, not a model"),
        (["--pair", "smollm2-sanity", "--prompts-file", "empty.txt"], "prompts file 'empty.txt' holds no prompts"),
        (["--pair", "smollm2-sanity", "--out", "/proc/x"], "output directory '/proc/x' cannot be created: '/proc' "
                                                          "is not writable"),
        (["--pair", "smollm2-sanity", "--out", "/sys/x"], "is not writable"),
    ],
)
def test_bad_input_gives_one_clear_line_and_no_output(args, message, tmp_path, capsys):
    (tmp_path / "notamodel.txt").write_text("not a model\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    code, out, err = run_cli(capsys, *args, *(["--prompt", "hi"] if "--prompts-file" not in args else []),
                             *(["--out", "res"] if "--out" not in args else []))
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not [p for p in outputs(tmp_path / "res") if p.is_file()]


def test_tokenizer_mismatch_and_long_prompt_fail_before_output(tiny_model_dirs, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dirs["llama"], other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["fox"])
    tokenizer.save_pretrained(other)
    base = str(tiny_model_dirs["llama"])
    code, _, err = run_cli(capsys, "--base", base, "--sft", str(other), "--prompt", "the quick brown fox",
                           "--out", "res")
    assert code == 1 and "disagree on prompt 0 at token position" in err
    code, _, err = run_cli(capsys, "--base", base, "--sft", base, "--prompt", "fox " * 300, "--out", "res")
    assert code == 1 and "context of 256 tokens" in err
    assert not [p for p in outputs(tmp_path / "res") if p.is_file()]


@pytest.mark.parametrize(
    "text, message",
    [
        ("residual_compare: [unclosed", "is not valid YAML"),
        ("residual_compare:\n  pair: llama8b\n  dtpye: float32\n",
         "residual_compare.dtpye: unknown key (did you mean 'dtype'?)"),
        ("residual_compare:\n  tokens: ten\n", "residual_compare.tokens: expected an integer"),
        ("other_block: {}\n", "expected exactly one top-level key 'residual_compare'"),
    ],
)
def test_malformed_config_is_refused_with_the_key_path(text, message, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text(text)
    code, _, err = run_cli(capsys, "--config", "bad.yaml", "--out", "res")
    assert code == 1 and message in err


def test_dev_mode_selects_the_dev_config_and_flags_override(tmp_path, monkeypatch):
    from lens_compare.run import parse_args, resolve_config

    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "dev_config.yaml").write_text(
        "residual_compare:\n  pair: smollm2-sanity\n  tokens: 10\n  prompts: [a, b]\n")
    (tmp_path / "configs" / "prod_config.yaml").write_text("residual_compare:\n  pair: llama8b\n")
    monkeypatch.setenv("DEV_MODE", "true")
    config = resolve_config(parse_args(["--tokens", "50"]))
    assert (config.pair, config.tokens, config.prompts) == ("smollm2-sanity", 50, ("a", "b"))
    overridden = resolve_config(parse_args(["--base", "x/y", "--sft", "x/z"]))
    assert (overridden.pair, overridden.base_model) == (None, "x/y")
    monkeypatch.setenv("DEV_MODE", "false")
    assert resolve_config(parse_args([])).pair == "llama8b"


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out" / "result.json"

    def half_then_interrupt(tmp: Path) -> None:
        tmp.write_text('{"half": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, half_then_interrupt)
    assert list((tmp_path / "out").iterdir()) == []
    write_atomically(target, lambda tmp: tmp.write_text("{}"))
    assert target.read_text() == "{}"


def test_list_pairs(capsys):
    code, out, _ = run_cli(capsys, "--list-pairs")
    assert code == 0 and "llama8b" in out and "smollm2-dtype" in out


def test_prompts_files_txt_and_jsonl(tmp_path):
    from lens_compare.config import RunConfig
    from lens_compare.errors import ConfigError
    from lens_compare.pipeline.prepare import read_prompts

    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts(RunConfig(prompts_file=str(tmp_path / "p.txt"))) == ("first prompt", "second prompt")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a\\nb"}\n"plain string"\n')
    assert read_prompts(RunConfig(prompts_file=str(tmp_path / "p.jsonl"))) == ("a\nb", "plain string")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": 3}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected"):
        read_prompts(RunConfig(prompts_file=str(tmp_path / "bad.jsonl")))


def _no_bitsandbytes(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))


def _tiny_cpu(monkeypatch) -> None:
    from lens_compare.hardware import Machine
    from lens_compare.pipeline import preflight

    monkeypatch.setattr(preflight, "machine_for", lambda device, gpus: Machine("cpu", 1, 1e-4, 1e-4))


@pytest.mark.parametrize(
    "extra, setup, message",
    [
        (["--gpus", "0,5"], lambda mp: fake_cuda(mp, [(*H100, 81000)] * 2),
         "--gpus names cuda:5, which does not exist: this machine has 2 CUDA device(s) (0..1)"),
        (["--gpus", "0,x"], lambda mp: None, "expected comma-separated integers like 0,1,2,3"),
        (["--gpus", "0"], lambda mp: mp.setattr(torch.cuda, "is_available", lambda: False),
         "--gpus 0 needs CUDA devices, and CUDA is not available here"),
        (["--gpus", "1", "--device", "cpu"], lambda mp: None, "add --device cuda"),
        (["--strategy", "nf4"], _no_bitsandbytes, "the nf4 strategy needs bitsandbytes, which is not installed: "
                                                  "pip install 'lens_compare[nf4]'"),
        (["--strategy", "resident"], _tiny_cpu, "refusing to load: the 'resident' strategy does not fit on CPU"),
        (["--shard-size", "0"], lambda mp: None, "residual_compare.shard_size: must be >= 1 prompt, got 0"),
    ],
)
def test_bad_strategy_input_is_one_line_and_leaves_no_file(extra, setup, message, tiny_model_dirs, tmp_path,
                                                          capsys, monkeypatch):
    from lens_compare.engines import loaded as model_loading

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(model_loading, "load_hf_model", refuse)
    setup(monkeypatch)
    model = str(tiny_model_dirs["llama"])
    code, _, err = run_cli(capsys, "--base", model, "--sft", model, "--prompt", "hello", "--out", "res", *extra)
    assert code == 1
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not [p for p in outputs(tmp_path / "res") if p.is_file()]


def test_a_reader_that_goes_away_ends_the_cli_quietly(tmp_path):
    """``python -m lens_compare.plan --table | head``: no BrokenPipeError traceback."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = ("from lens_compare.cli import exit_with\n"
              "exit_with(lambda: [print('row ' * 20) for _ in range(200000)] and 0)")
    pipeline = subprocess.run(f"{sys.executable} -c \"{script}\" | head -1", shell=True, capture_output=True,
                              text=True, cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert pipeline.stdout.startswith("row row")
    assert pipeline.stderr == ""
    for module in ("plan", "run", "convert"):
        assert "exit_with(main)" in (root / "lens_compare" / f"{module}.py").read_text()


def test_failed_validation_leaves_no_output_directory_and_reads_no_model_file(tiny_model_dirs, tmp_path, capsys,
                                                                              monkeypatch):
    from lens_compare.pipeline import prepare

    def refuse(*args, **kwargs):
        raise AssertionError("a model's config was read before the prompts were checked")

    monkeypatch.setattr(prepare._Loaded, "config", refuse)
    out = tmp_path / "new" / "out"
    directory = str(tiny_model_dirs["llama"])
    assert main(["--base", directory, "--sft", directory, "--out", str(out)]) == 1
    assert "no prompts given" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def test_the_config_file_used_is_logged_first_and_recorded(tiny_model_dirs, tmp_path, monkeypatch, caplog):
    import json
    import logging

    directory = str(tiny_model_dirs["llama"])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEV_MODE", raising=False)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "prod_config.yaml").write_text("residual_compare:\n  dtype: bfloat16\n")
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        assert main(["--base", directory, "--sft", directory, "--prompt", "hello", "--out", "out"]) == 0
    first = caplog.records[0].getMessage()
    assert first.startswith("config file: configs/prod_config.yaml (DEV_MODE='' found it in ./configs)")
    result = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert result["provenance"]["config_file"] == "configs/prod_config.yaml"
    assert result["provenance"]["dtype"] == {"base": "bfloat16", "sft": "bfloat16"}
    (tmp_path / "configs" / "prod_config.yaml").unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        assert main(["--base", directory, "--sft", directory, "--prompt", "hello", "--out", "out2"]) == 0
    assert caplog.records[0].getMessage().startswith("config file: none; built-in defaults")
    result = json.loads(next((tmp_path / "out2").glob("*.json")).read_text())
    assert result["provenance"]["config_file"] is None
    assert result["provenance"]["dtype"] == {"base": "float32", "sft": "float32"}


def test_unreachable_hub_reads_the_local_cache_at_once(monkeypatch):
    """Without HF_HUB_OFFLINE and without network, hub ids load local_files_only (no ~27 s of retries)."""
    import socket

    from lens_compare.models import loading

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    loading.hub_reachable.cache_clear()
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no route")))
    ref = loading.resolve_ref("Qwen/Qwen2.5-0.5B")
    assert ref.file_kwargs == {"local_files_only": True}
    loading.hub_reachable.cache_clear()

    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    assert ref.file_kwargs == {}
    loading.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert ref.file_kwargs == {"local_files_only": True}
    loading.hub_reachable.cache_clear()


def test_one_token_prompts_are_refused_before_loading_unless_position_0_is_aggregated(tiny_model_dirs, tmp_path,
                                                                                       capsys, monkeypatch):
    """Position 0 is left out of the aggregates: prompts of one token leave nothing to aggregate."""
    from lens_compare.engines import loaded as model_loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    model = str(tiny_model_dirs["llama"])
    with monkeypatch.context() as patch:
        patch.setattr(model_loading, "load_hf_model", no_loading)
        code, _, err = run_cli(capsys, "--base", model, "--sft", model, "--prompt", "", "--out", "res")
    assert code == 1 and "every prompt is a single token" in err and "--include-first-token" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = run_cli(capsys, "--base", model, "--sft", model, "--prompt", "", "--include-first-token",
                             "--out", "res")
    assert code == 0, err
    document = json.loads(next(Path(p) for p in out.split() if p.endswith(".json")).read_text())
    assert document["aggregation"]["n_tokens"] == 1 and document["resid_post"][0]["cosine"]["mean"] == 1.0


def test_filler_text_flag_pads_short_prompts(tiny_model_dirs, capsys):
    model = str(tiny_model_dirs["llama"])
    code, _, err = run_cli(capsys, "--base", model, "--sft", model, "--prompt", "hello", "--tokens", "20",
                           "--out", "res")
    assert code == 1 and "--filler-text TEXT" in err
    code, out, err = run_cli(capsys, "--base", model, "--sft", model, "--prompt", "hello", "--tokens", "20",
                             "--filler-text", "the quick brown fox", "--out", "res", "-q")
    assert code == 0, err
    document = json.loads(next(Path(p) for p in out.split() if p.endswith(".json")).read_text())
    assert [len(ids) for ids in document["provenance"]["token_ids"]] == [20]
    assert document["provenance"]["texts"][0].startswith("hello the quick brown fox")


def test_a_rerun_reuses_the_run_folder_and_its_outputs(tiny_model_dirs, tmp_path, capsys, caplog):
    """The same command twice: the second loads no model, rewrites the first run's files in place and says so."""
    import logging

    model = str(tiny_model_dirs["llama"])
    args = ["--base", model, "--sft", model, "--prompt", "the quick brown fox", "--csv", "--out", "res"]
    code, first, err = run_cli(capsys, *args)
    assert code == 0, err
    before = outputs(tmp_path / "res")
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        code, second, err = run_cli(capsys, *args)
    assert code == 0, err
    assert second.split() == first.split() and outputs(tmp_path / "res") == before
    assert "rewritten in place" in caplog.text
    assert "reassembled from its run folder without loading a model (the run itself took" in caplog.text


def test_a_run_logs_what_applies_and_keeps_the_rest_in_the_json(tiny_model_dirs, capsys, caplog):
    """A few lines before the models load: the config's non-default values, the logit lens's choice, the
    plan in one line, the steering check's choice; no note that does not concern the run. The whole plan
    goes to the JSON."""
    import logging

    model = str(tiny_model_dirs["llama"])
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        code, out, err = run_cli(capsys, "--base", model, "--sft", model, "--prompt", "the quick brown fox",
                                 "--out", "res")
    assert code == 0, err
    before = caplog.text.split("loading base model")[0].strip().splitlines()
    assert len(before) <= 7, before
    assert any("steering check on at layers 0, 1, 2 x 3 alpha(s) (auto: the check takes ~" in line
               for line in before), before
    config_line = next(line for line in before if "differ from the built-in defaults" in line)
    assert "base_model=" in config_line and "dtype=" not in config_line and "batch_size" not in config_line
    assert any("logit lens at the output only" in line and "--logit-lens all would add" in line for line in before)
    assert any("plan: resident on CPU" in line for line in before)
    for stray in ("nf4", "skipping capture", "est_seconds", "run terms"):
        assert stray not in caplog.text, stray
    document = json.loads(next(Path(p) for p in out.split() if p.endswith(".json")).read_text())
    plan = document["provenance"]["plan"]["plan"]
    assert plan["strategy"] == "resident" and set(plan["strategies"]) == {"resident", "sequential", "nf4", "stream"}
    assert any(note.startswith("est_seconds") for note in plan["notes"])


@pytest.mark.parametrize("module", ["run", "plan", "convert", "demo_ft"])
@pytest.mark.parametrize("argv", [["--frobnicate"], ["--dtype", "fp16"]])
def test_every_command_refuses_a_bad_flag_with_one_prefixed_line_and_exit_1(module, argv, capsys):
    import importlib

    main = importlib.import_module(f"lens_compare.{module}").main
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("lens_compare: error: ") and len(err.strip().splitlines()) == 1
    assert f"python -m lens_compare.{module} --help" in err


def test_run_flags_and_compare_keywords_come_from_the_config_declarations():
    import inspect

    from lens_compare.config import RunConfig, fingerprinted, run_options
    from lens_compare.run import parser

    flags = {action.dest for action in parser()._actions}
    keywords = set(inspect.signature(lens_compare.compare).parameters)
    for field, spec in run_options():
        assert (field.name in flags) == (spec.flag is not None), field.name
        assert ((spec.keyword or field.name) in keywords) == (spec.keyword is not None), field.name
    assert set(fingerprinted(RunConfig())) == {field.name for field, spec in run_options() if not spec.output_only}
    with pytest.raises(lens_compare.ConfigError, match="unknown keyword 'tokns' \\(did you mean 'tokens'\\?\\)"):
        lens_compare.compare("smollm2-sanity", "hi", tokns=5)
