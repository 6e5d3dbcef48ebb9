"""Long prompt sets: shards, the run folder, resume after SIGKILL, and the streamed residuals file."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens_compare import RunConfig
from lens_compare.engines.shards import ShardLayout, default_shard_size
from lens_compare.engines.store import RunFolder, RunFolderError
from lens_compare.models.load_options import LoadOptions
from lens_compare.pipeline.comparison import run_comparison
from lens_compare.pipeline.execution import Execution
from lens_compare.run import main


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Run in an empty directory so no repository config is picked up."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEV_MODE", raising=False)


PROMPTS = [f"prompt {i}: the quick brown fox jumps over the lazy dog " + "and again " * (i % 4) for i in range(10)]


def test_layout_and_default_size():
    assert ShardLayout(10, 4).bounds == ((0, 4), (4, 8), (8, 10))
    assert ShardLayout(3, 8).count == 1
    # 2 GiB over 1 MiB per prompt: 2048 prompts, a whole number of batches of 12
    assert default_shard_size(2**20, batch_size=12) == 2040
    assert default_shard_size(3 * 2**30, batch_size=8) == 1


def _cpu(schedule):
    options = LoadOptions("float32", "cpu")
    return lambda facts: Execution(schedule, schedule, {"base": options, "sft": options})


@pytest.mark.parametrize("schedule", ["resident", "sequential"])
def test_sharded_run_equals_one_shard(perturbed_llama, schedule):
    base, sft, _ = perturbed_llama
    config = RunConfig(base_model=str(base), sft_model=str(sft), prompts=tuple(PROMPTS), batch_size=2)
    whole = run_comparison(config.replace(shard_size=10), preflight=_cpu(schedule))
    sharded = run_comparison(config.replace(shard_size=4), preflight=_cpu(schedule), keep_residuals=True)
    assert sharded.provenance["shards"] == {"count": 3, "size": 4}
    strip = lambda d: {k: v for k, v in d.items() if k != "provenance"}  # noqa: E731
    assert strip(sharded.to_dict()) == strip(whole.to_dict())
    assert sharded.residuals[0].values.shape[1] == len(PROMPTS)


def test_shards_run_one_at_a_time_by_separate_comparisons_equal_one_run(perturbed_llama, tmp_path):
    """What a sweep's workers do: each builds the same Comparison, finds the run folder by the
    run's fingerprint and runs one shard; the driver assembles once all are in."""
    from lens_compare.pipeline.comparison import Comparison, open_run_folder

    base, sft, _ = perturbed_llama
    config = RunConfig(base_model=str(base), sft_model=str(sft), prompts=tuple(PROMPTS), batch_size=2, shard_size=4)
    whole = run_comparison(config, preflight=_cpu("sequential"))
    driver = Comparison(config, preflight=_cpu("sequential"), held_in_memory=False)
    folder = open_run_folder(driver, tmp_path)
    with pytest.raises(RuntimeError, match="3 of 3 shard"):
        driver.assemble(folder)
    for shard in (2, 0, 1):
        worker = Comparison(config, preflight=_cpu("sequential"), held_in_memory=False)
        worker.run_shard(shard, open_run_folder(worker, tmp_path))
        assert driver.pending(folder) == [s for s in (0, 1, 2) if s not in (2, 0, 1)[: (2, 0, 1).index(shard) + 1]]
    with pytest.raises(IndexError, match="shard 3 does not exist"):
        driver.run_shard(3, folder)
    strip = lambda d: {k: v for k, v in d.items() if k != "provenance"}  # noqa: E731
    assert strip(driver.assemble(folder).to_dict()) == strip(whole.to_dict())


def _cli(tmp_path: Path, base, sft, out: str, *extra: str, prompts=PROMPTS) -> list[str]:
    prompts_file = tmp_path / f"prompts-{len(prompts)}-{hash(tuple(prompts)) & 0xffff}.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    return ["--base", str(base), "--sft", str(sft), "--prompts-file", str(prompts_file), "--batch-size", "2",
            "--shard-size", "2", "--out", str(tmp_path / out), *extra, "--csv", "-q"]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from lens_compare.engines import store
    from lens_compare.run import main
    kind, after = store.Kind[sys.argv[1]], int(sys.argv[2])
    original = store.RunFolder.put
    calls = []
    def dying(self, put_kind, *args, **kwargs):
        original(self, put_kind, *args, **kwargs)
        calls.append(put_kind)
        if calls.count(kind) == after:
            os.kill(os.getpid(), signal.SIGKILL)
    store.RunFolder.put = dying
    sys.exit(main(sys.argv[3:]))
""")


def _kill_after(tmp_path: Path, kind: str, after: int, args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", KILLER, kind, str(after), *args], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


def _outputs(capsys) -> dict[str, Path]:
    lines = [Path(line) for line in capsys.readouterr().out.split()]
    return {"".join(p.suffixes[-2:]) if ".tokens" in p.name or ".summary" in p.name else p.suffix: p for p in lines}


def _same_outputs(a: dict[str, Path], b: dict[str, Path], same_command: bool = True) -> None:
    """Identical outputs; from the same command, identical provenance too (but the time, and the plan
    for the machine as each first run found it: its free memory)."""
    assert set(a) == set(b)
    first, second = (json.loads(x[".json"].read_text()) for x in (a, b))
    for doc in (first, second):
        doc["provenance"].pop("timestamp")
        doc["provenance"].pop("plan")
        doc["provenance"]["config"].pop("output_dir")
        if not same_command:
            doc.pop("provenance")
    assert first == second
    for suffix in (".tokens.csv", ".summary.csv"):
        assert a[suffix].read_text() == b[suffix].read_text()
    if ".safetensors" in a:
        x, y = load_file(str(a[".safetensors"])), load_file(str(b[".safetensors"]))
        assert set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, kind, after", [
    ("resident", "METRICS", 2),      # killed after 2 of 5 shards
    ("sequential", "STATES", 3),     # killed while the base model spills its shards
    ("sequential", "METRICS", 1),    # killed while the SFT model compares
    ("stream", "STATE_METRICS", 2),  # killed in the first shard, after its embeddings and block 0
    ("stream", "STATE", 5),          # killed between the base and SFT model's state 2
])
def test_killed_run_resumes_to_identical_outputs(perturbed_llama, tmp_path, capsys, caplog, strategy, kind, after):
    base, sft, _ = perturbed_llama
    assert main(_cli(tmp_path, base, sft, "clean", "--strategy", strategy)) == 0
    clean = _outputs(capsys)
    args = _cli(tmp_path, base, sft, "killed", "--strategy", strategy)
    _kill_after(tmp_path, kind, after, args)
    folders = list((tmp_path / "killed" / "runs").iterdir())
    assert len(folders) == 1
    finished = len(list((folders[0] / "metrics").glob("*.safetensors")))
    assert finished == (after if kind == "METRICS" else 0)
    caplog.clear()
    with caplog.at_level("INFO", logger="lens_compare"):
        assert main(args[:-1]) == 0  # without -q: the resume line is logged
    assert f"{finished} of 5 shard(s) already finished" in caplog.text
    if kind == "STATES":
        assert f"{after} base shard(s) spilled" in caplog.text
    resumed = _outputs(capsys)
    _same_outputs(resumed, clean)
    assert not list(folders[0].rglob(".*.tmp"))
    assert not list((folders[0] / "states").glob("*")), "spilled residuals are deleted at the end"
    if strategy == "stream":
        assert "resuming the stream after block" in caplog.text
        assert not (folders[0] / "layers").exists(), "the stream's resume points are deleted at the end"


@pytest.mark.slow
def test_save_residuals_is_assembled_from_shards(perturbed_llama, tmp_path, capsys):
    base, sft, _ = perturbed_llama
    assert main(_cli(tmp_path, base, sft, "one", "--save-residuals", "--shard-size", "10")) == 0
    one = _outputs(capsys)
    assert main(_cli(tmp_path, base, sft, "many", "--save-residuals", "--strategy", "sequential")) == 0
    many = _outputs(capsys)
    _same_outputs(many, one, same_command=False)
    tensors = load_file(str(many[".safetensors"]))
    assert tensors["base/blocks.0.hook_resid_post"].shape == (10, tensors["token_ids"].shape[1], 64)
    assert torch.equal(tensors["sft/blocks.1.hook_resid_post"], tensors["sft/blocks.2.hook_resid_pre"])
    folder = next((tmp_path / "many" / "runs").iterdir())
    assert len(list((folder / "states").glob("*.safetensors"))) == 10, "kept with --save-residuals"


@pytest.mark.slow
def test_changed_prompts_get_their_own_folder(perturbed_llama, tmp_path, capsys):
    base, sft, _ = perturbed_llama
    assert main(_cli(tmp_path, base, sft, "out", prompts=PROMPTS[:4])) == 0
    assert main(_cli(tmp_path, base, sft, "out", prompts=PROMPTS[:3] + ["something else"])) == 0
    assert main(_cli(tmp_path, base, sft, "out", "--layers", "1,2", prompts=PROMPTS[:4])) == 0
    capsys.readouterr()
    folders = sorted((tmp_path / "out" / "runs").iterdir())
    assert len(folders) == 3
    manifests = [json.loads((f / "manifest.json").read_text()) for f in folders]
    assert len({m["token_ids_sha256_16"] for m in manifests}) == 2


def test_run_folder_refuses_a_foreign_manifest(tmp_path):
    RunFolder(tmp_path / "run", {"a": 1})
    with pytest.raises(RunFolderError, match="holds a different run"):
        RunFolder(tmp_path / "run", {"a": 2})


def test_resume_clears_leftover_temporary_files(tmp_path):
    folder = RunFolder(tmp_path / "run", {"a": 1})
    stale = folder.path / "metrics" / ".00000.safetensors.abc.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"half")
    RunFolder(tmp_path / "run", {"a": 1})
    assert not stale.exists()


def test_spill_bytes_and_disk_refusal(perturbed_llama, tmp_path, monkeypatch, capsys):
    import shutil

    from lens_compare.pipeline.comparison import Comparison
    from lens_compare.pipeline.steps import spill_bytes

    base, sft, _ = perturbed_llama
    config = RunConfig(base_model=str(base), sft_model=str(sft), prompts=tuple(PROMPTS), batch_size=2,
                       shard_size=4)

    def spilled(config, schedule, keep_residuals=False):
        planned = Comparison(config, preflight=_cpu(schedule), keep_residuals=keep_residuals).plan()
        return spill_bytes(planned.run, planned.job, planned.execution), planned

    # The difference lens's spill for its top positions: every real token but position 0 at each of
    # the 3 layers, a float16 unit vector (d 64) and 20 bytes beside it; none without the positions.
    units = sum(length - 1 for length in Comparison(config, preflight=_cpu("resident")).plan().run.tokenized.lengths
                ) * 3 * (2 * 64 + 20)
    assert spilled(config, "resident")[0] == units
    config = config.replace(difference_lens_positions=0, steer=False)
    sequential, planned = spilled(config, "sequential")
    lengths = planned.run.tokenized.lengths
    widths = [max(lengths[a:b]) for a, b in planned.layout.bounds]
    # 4 states and 2 sublayer outputs of each of 3 blocks, d 64, float32.
    expected = sum((4 + 2 * 3) * (b - a) * w * 64 * 4 for (a, b), w in zip(planned.layout.bounds, widths, strict=True))
    assert sequential == expected
    assert spilled(config.replace(components=False), "sequential")[0] == expected * 4 // 10
    assert spilled(config, "sequential", keep_residuals=True)[0] == 2 * expected
    assert spilled(config, "resident")[0] == 0
    # With the steering check, a sequential run also keeps the SFT model's last state of each unit
    # (every prompt at the longest prompt's width) until the base model has run again.
    steered = spilled(config.replace(steer=True), "sequential")[0]
    assert steered - expected == len(lengths) * max(lengths) * 64 * 4

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1))
    code = main(_cli(tmp_path, base, sft, "full", "--strategy", "sequential"))
    err = capsys.readouterr().err
    assert code == 1 and "spills up to" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "full" / "runs").exists()
