"""Sweeps, local executor: lengths as prefixes of one capture equal separate runs, failures stay
isolated, and the same call again redoes only what is missing."""

import json

import pytest

from lens_compare import RunConfig
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.tokens import TokenizedPrompts
from lens_compare.pipeline.comparison import run_comparison
from lens_compare.pipeline.execution import Execution
from lens_compare.results.saved import load_run
from lens_compare.sweeps.index import SweepIndex
from lens_compare.sweeps.local import run_sweep
from lens_compare.sweeps.prefix import capture_lengths
from tests.fixtures.sweeps import assert_documents_close

PROMPTS = ("the quick brown fox jumps over the lazy dog and runs into the old forest",
           "a model of the world is only as good as the data it has seen so far today",
           "hello world, this is a test of the sweep over several token lengths at once")


def _cpu(facts):
    options = LoadOptions("float32", "cpu")
    return Execution("resident", "resident", {"base": options, "sft": options})


@pytest.fixture
def pairs_file(perturbed_llama, tmp_path):
    base, sft, _ = perturbed_llama
    path = tmp_path / "pairs.yaml"
    path.write_text(f"pairs:\n  tiny:\n    base: {base}\n    sft: {sft}\n"
                    f"  broken:\n    base: {tmp_path / 'missing'}\n    sft: {tmp_path / 'missing'}\n")
    return path


def _config(pairs_file, **extra):
    return RunConfig(pairs_file=str(pairs_file), prompts=PROMPTS, batch_size=2, shard_size=2, bootstrap=50,
                     logit_lens="all", top_tokens=3, **extra)


def _without_volatile(document):
    document = json.loads(json.dumps(document))
    document["provenance"].pop("timestamp")
    return document


def test_lengths_read_off_one_capture_equal_separate_runs(pairs_file, tmp_path):
    config = _config(pairs_file)
    index = run_sweep(["tiny"], [12, 6], config, tmp_path / "out", preflight=_cpu)
    found = sorted((e.tokens, e.status, e.captured_at) for e in index.entries.values())
    assert found == [(6, "done", 12), (12, "done", 12)]
    assert len(list((tmp_path / "out" / "runs").iterdir())) == 1, "one capture for both lengths"
    for tokens in (6, 12):
        written = json.loads((tmp_path / "out" / f"tiny-{tokens}tok.json").read_text())
        # The steering check (auto: on for this tiny pair) ran on the capture's whole prompts; the length
        # read off it has none of its own, as a separate run with --no-steer.
        assert (written["steering"] is None) == (tokens == 6)
        steer = {"steer": False} if tokens == 6 else {}
        separate = run_comparison(config.given({"pair": "tiny", "tokens": tokens, **steer}), preflight=_cpu)
        assert written["provenance"]["config"]["tokens"] == tokens
        # The capture also summed the 6-token prefix for the difference lens, and says so.
        assert written["provenance"]["config"].pop("prefix_lengths") == ([6] if tokens == 12 else [])
        separate_document = separate.to_dict()
        separate_document["provenance"]["config"].pop("prefix_lengths")
        assert [len(ids) for ids in written["provenance"]["token_ids"]] == [tokens] * len(PROMPTS)
        assert_documents_close(_without_volatile(written), _without_volatile(separate_document))
    short = load_run(tmp_path / "out" / "tiny-6tok.json")
    assert short.layers == (0, 1, 2)


def _tokenized(*rows):
    return TokenizedPrompts(tuple("p" for _ in rows), tuple("p" for _ in rows), tuple(rows), "none")


def test_which_lengths_ride_on_a_longer_capture(pairs_file):
    long = _tokenized(tuple(range(12)), tuple(range(100, 112)))
    short = _tokenized(tuple(range(6)), tuple(range(100, 106)))
    moved = _tokenized(tuple(range(6)), (100, 101, 102, 103, 104, 999))  # a cut that changed a token
    assert capture_lengths({6: short, 12: long}, _config(pairs_file)) == {6: 12, 12: 12}
    assert capture_lengths({6: moved, 12: long}, _config(pairs_file)) == {6: 6, 12: 12}
    # Runs that need the states themselves capture at every length.
    assert capture_lengths({6: short, 12: long}, _config(pairs_file, cka=True)) == {6: 6, 12: 12}
    assert capture_lengths({6: short, 12: long}, _config(pairs_file, save_residuals=True)) == {6: 6, 12: 12}
    # So do runs that ask for the steering check, which runs the models again on each length's prompts.
    assert capture_lengths({6: short, 12: long}, _config(pairs_file, steer=True)) == {6: 6, 12: 12}


def test_a_failing_pair_is_recorded_and_a_rerun_redoes_only_what_is_missing(pairs_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = _config(pairs_file)
    index = run_sweep(["broken", "tiny"], [6], config, out, preflight=_cpu)
    entries = {e.pair: e for e in index.entries.values()}
    assert entries["tiny"].status == "done" and entries["broken"].status == "failed"
    assert "missing" in entries["broken"].reason and "\n" not in entries["broken"].reason
    assert json.loads((out / "sweep.json").read_text())["runs"][0]["pair"] == "broken"
    # Again: only the failed pair is tried (a done run's JSON is there), and a new length runs.
    from lens_compare.sweeps import local

    tried = []
    real = local._plans
    monkeypatch.setattr(local, "_plans", lambda pair, *a: tried.append(pair) or real(pair, *a))
    again = run_sweep(["broken", "tiny"], [6], config, out, preflight=_cpu)
    assert tried == ["broken"] and SweepIndex.open(out).entries == again.entries
    (out / "tiny-6tok.json").unlink()
    run_sweep(["tiny"], [6], config, out, preflight=_cpu)
    assert tried == ["broken", "tiny"] and (out / "tiny-6tok.json").is_file()


def test_the_command_writes_every_run_the_index_and_the_table_and_exits_1_on_a_failure(pairs_file, tmp_path,
                                                                                       monkeypatch, capsys):
    import pandas as pd

    import lens_compare
    from lens_compare.sweep import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEV_MODE", raising=False)
    args = ["--pairs-file", str(pairs_file), "--tokens", "12,6", "--batch-size", "2", "--bootstrap", "20",
            *(arg for prompt in PROMPTS for arg in ("--prompt", prompt)), "--out", "sw", "-q"]
    assert main(["--pairs", "tiny", *args, "--plots"]) == 0
    assert all((tmp_path / "sw" / f"sweep.{name}.png").is_file() for name in ("heatmap", "curves", "costs"))
    table = pd.read_parquet(tmp_path / "sw" / "sweep.parquet")
    assert list(table.columns[:2]) == ["pair", "tokens"] and set(table["tokens"]) == {6, 12}
    assert "tiny" in capsys.readouterr().out
    assert main(["--pairs", "tiny,broken", *args]) == 1
    out = capsys.readouterr().out
    assert "broken" in out and "failed" in out
    # The notebook path: the same sweep, nothing missing, so nothing runs again.
    index = lens_compare.sweep("tiny", [6, 12], out=tmp_path / "sw", pairs_file=str(pairs_file), prompts=PROMPTS,
                               batch_size=2, bootstrap=20)
    assert {e.tokens for e in index.entries.values() if e.pair == "tiny" and e.status == "done"} == {6, 12}


@pytest.mark.parametrize("argv, message", [
    (["--pairs", "tiny", "--tokens", "10,x"], "expected comma-separated positive integers"),
    (["--pairs", "tinny"], "unknown pair 'tinny'"),
    (["--pairs", "tiny", "--tokens", "0,10"], "expected comma-separated positive integers"),
    (["--pairs", "tiny", "--workers", "0"], "--workers 0: expected a whole number of at least 1"),
    (["--tokens", "10"], "which pairs? give --pairs KEY,KEY,..."),
])
def test_bad_sweep_input_is_one_line_and_exit_1(argv, message, pairs_file, tmp_path, monkeypatch, capsys):
    from lens_compare.sweep import main

    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--pairs-file", str(pairs_file), "--prompt", "hi", "--out", "sw"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lens_compare: error:") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sw" / "sweep.json").exists()


def test_the_dry_run_plans_the_seed_pairs_and_a_sweep_without_prompts_is_refused(tmp_path, monkeypatch, capsys):
    from lens_compare.sweep import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEV_MODE", raising=False)
    assert main(["--pairs", "seed", "--tokens", "10,250", "--dry-run", "--gpu", "h100", "--count", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 + 36 and "36 runs on 8x H100" in out  # header, rule, then 18 pairs x 2 lengths
    assert main(["--pairs", "qwen7b", "--out", "sw"]) == 1
    assert "give --prompt TEXT" in capsys.readouterr().err and not (tmp_path / "sw").exists()


def test_the_progress_bar_counts_runs_moves_with_the_shards_and_writes_a_line_per_run(pairs_file, tmp_path, capsys):
    import threading

    from lens_compare.sweeps.index import SweepEntry
    from lens_compare.sweeps.progress import SweepProgress

    # A capture serving 2 runs, 4 shards, 3 of them in: the bar stands at 1 (done before) + 2 x 3/4.
    left = [0, 1, 2, 3]
    seen = []
    with SweepProgress(total=4, initial=1, poll_seconds=0.01) as progress:
        progress.watch("capture", "tiny", 12, runs=2, pending=lambda: list(left), shards=4)
        for _ in range(3):
            left.pop()
            event = threading.Event()
            event.wait(0.05)
            seen.append(progress.done)
        progress.unwatch("capture")
        assert seen[-1] == pytest.approx(1 + 2 * 3 / 4)
        assert seen == sorted(seen)
        progress.finished(SweepEntry("tiny", 12, "done", json="tiny-12tok.json", captured_at=12, strategy="resident",
                                     seconds=1.5, peak_gib=0.25))
        progress.finished(SweepEntry("tiny", 6, "failed", reason="ValueError: no"))
        assert progress.done == 3
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["tiny at 12 tokens: done in 1.5 s (resident, peak 0.25 GiB) -> tiny-12tok.json",
                     "tiny at 6 tokens: failed: ValueError: no"]
    # A sweep: one line per run, whatever ended it, each with its peak memory where it ran.
    index = run_sweep(["broken", "tiny"], [6, 12], _config(pairs_file), tmp_path / "out", preflight=_cpu)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and sum("done in" in line for line in lines) == 2
    assert "tiny at 6 tokens: done" in lines[-1] and "read off the 12-token capture" in lines[-1]
    peaks = {entry.peak_gib for entry in index.entries.values() if entry.status == "done"}
    assert len(peaks) == 1 and 0.05 < peaks.pop() < 24


def test_a_sweep_file_holds_the_sweep_and_its_run_options_and_flags_win(pairs_file, tmp_path, monkeypatch, capsys):
    from lens_compare.sweep import main

    monkeypatch.chdir(tmp_path)
    prompts = "".join(f"    - {prompt}\n" for prompt in PROMPTS)
    (tmp_path / "study.yaml").write_text(
        f"sweep:\n  pairs: [tiny]\n  tokens: [12, 6]\n  executor: local\n"
        f"residual_compare:\n  pairs_file: {pairs_file}\n  batch_size: 2\n  bootstrap: 20\n"
        f"  output_dir: study\n  prompts:\n{prompts}")
    assert main(["--config", "study.yaml", "--tokens", "6", "-q"]) == 0
    index = json.loads((tmp_path / "study" / "sweep.json").read_text())
    assert [(run["pair"], run["tokens"], run["status"]) for run in index["runs"]] == [("tiny", 6, "done")]
    capsys.readouterr()
    (tmp_path / "bad.yaml").write_text("sweep:\n  pairs: tiny\n  frobnicate: 1\n")
    assert main(["--config", "bad.yaml"]) == 1
    err = capsys.readouterr().err
    assert "sweep.frobnicate is not a sweep key" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad.yaml").write_text("sweep:\n  pairs: tiny\n  workers: two\n")
    assert main(["--config", "bad.yaml"]) == 1
    assert "sweep.workers: expected int, got str 'two'" in capsys.readouterr().err


def test_an_unreachable_ray_address_is_one_line_at_once(pairs_file, tmp_path, monkeypatch, capsys):
    """Ray retries a dead address for minutes; the sweep refuses it in one line, in seconds, before
    anything loads or its --out is made."""
    import socket
    import time

    from lens_compare.sweep import main

    pytest.importorskip("ray", reason="the ray extra is not installed")
    with socket.socket() as probe:  # a port nothing listens on once this closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    argv = ["--pairs", "tiny", "--pairs-file", str(pairs_file), "--prompt", "hi", "--out", "sw", "--executor", "ray"]
    assert main([*argv, "--ray-address", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert f"nothing answers at 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
    assert time.perf_counter() - start < 30 and not (tmp_path / "sw").exists()
    assert main([*argv, "--ray-address", "nohost"]) == 1
    assert "expected HOST:PORT" in capsys.readouterr().err
