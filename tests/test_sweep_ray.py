"""The ray executor on this machine: a local Ray instance (shared by the module's tests, on one
xdist worker: Ray and xdist together are flaky) gives the local executor's results, a killed
worker costs only its call, and a missing extra or unshared storage is refused in one line."""

import json
import os
import signal
from pathlib import Path

import pytest

from lens_compare import RunConfig
from lens_compare.sweeps.local import run_sweep
from tests.fixtures.sweeps import PROMPTS, assert_documents_close, written_documents

ray = pytest.importorskip("ray", reason="the ray extra is not installed")

pytestmark = pytest.mark.xdist_group("ray")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def local_ray():
    # The workers import lens_compare from this checkout, as the driver does.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), before]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
    if before is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = before


@pytest.fixture
def pairs_file(perturbed_llama, tmp_path):
    base, sft, _ = perturbed_llama
    path = tmp_path / "pairs.yaml"
    path.write_text(f"pairs:\n  tiny:\n    base: {base}\n    sft: {sft}\n")
    return path


def _config(pairs_file):
    return RunConfig(pairs_file=str(pairs_file), prompts=PROMPTS, batch_size=2, shard_size=2, bootstrap=50,
                     logit_lens="all", device="cpu")


def test_a_ray_sweep_equals_the_local_sweep(local_ray, pairs_file, tmp_path):
    from lens_compare.sweeps.ray_executor import RayExecutor

    config = _config(pairs_file)
    local = run_sweep(["tiny"], [6, 12], config, tmp_path / "local")
    shards = RayExecutor(workers=2)
    shards.check_shared_storage(tmp_path / "ray")
    remote = run_sweep(["tiny"], [6, 12], config, tmp_path / "ray", executor=shards)
    assert {e.key: e.status for e in remote.entries.values()} == {e.key: e.status for e in local.entries.values()}
    assert all(e.status == "done" for e in remote.entries.values())
    assert written_documents(tmp_path / "ray") == written_documents(tmp_path / "local")


def test_a_worker_killed_mid_shard_costs_only_its_call(local_ray, pairs_file, tmp_path):
    """SIGKILL to an actor's process while it runs its shards: Ray restarts it and retries the call,
    which skips the shards already written; the results equal a clean run's."""
    import time

    from lens_compare.engines.store import Kind
    from lens_compare.pipeline.comparison import Comparison, open_run_folder
    from lens_compare.sweeps.ray_executor import ShardWorker, actor_options

    config = _config(pairs_file).given({"pair": "tiny", "tokens": 12, "shard_size": 1})
    comparison = Comparison(config, held_in_memory=False)
    folder = open_run_folder(comparison, tmp_path / "out")
    actor = ray.remote(ShardWorker).options(**actor_options(comparison.plan().execution)).remote(False)
    first = ray.get(actor.pid.remote())
    call = actor.run.remote(config.to_dict(), str(tmp_path / "out"), str(folder.path), list(range(len(PROMPTS))))
    while not folder.keys(Kind.METRICS):  # the first shard is written: the call is under way
        time.sleep(0.02)
    left = comparison.pending(folder)
    os.kill(first, signal.SIGKILL)
    peak = ray.get(call)  # the restarted actor's peak memory while it ran the retried call
    assert isinstance(peak, float) and 0 < peak < 24
    assert left, "the kill came after the last shard: nothing was interrupted"
    assert ray.get(actor.pid.remote()) != first, "the actor was restarted"
    assert comparison.pending(folder) == []
    clean = Comparison(config, held_in_memory=False)
    clean_folder = open_run_folder(clean, tmp_path / "clean")
    clean.run(clean_folder)
    strip = lambda d: {k: v for k, v in d.items() if k != "provenance"}  # noqa: E731
    assert strip(comparison.assemble(folder).to_dict()) == strip(clean.assemble(clean_folder).to_dict())


def test_several_pairs_run_side_by_side_and_one_pair_is_split_over_the_workers(local_ray, perturbed_llama, tmp_path,
                                                                            monkeypatch):
    """Two workers, two pairs: one actor per pair, both at work at once (each pair loaded once);
    two workers, one pair: its shards split over both. The results equal the local executor's."""
    from lens_compare.sweeps.ray_executor import RayExecutor

    base, sft, _ = perturbed_llama
    pairs_file = tmp_path / "pairs.yaml"
    pairs_file.write_text(f"pairs:\n  tiny:\n    base: {base}\n    sft: {sft}\n"
                          f"  twin:\n    base: {base}\n    sft: {sft}\n")
    config = _config(pairs_file)
    started, created = [], []
    dispatch, new_actor = RayExecutor._dispatch, RayExecutor._new_actor
    monkeypatch.setattr(RayExecutor, "_dispatch", lambda self, capture, chunk, idle: started.append(
        (capture.pair, tuple(chunk))) or dispatch(self, capture, chunk, idle))
    monkeypatch.setattr(RayExecutor, "_new_actor", lambda self, options: created.append(options) or new_actor(
        self, options))
    index = run_sweep(["tiny", "twin"], [12], config, tmp_path / "ray", executor=RayExecutor(workers=2))
    assert all(entry.status == "done" for entry in index.entries.values()) and len(index.entries) == 2
    assert started == [("tiny", (0, 1, 2)), ("twin", (0, 1, 2))]  # 6 prompts, 2 a shard
    started.clear()
    run_sweep(["tiny"], [12], config, tmp_path / "one", executor=RayExecutor(workers=2))
    assert started == [("tiny", (0, 2)), ("tiny", (1,))]
    # One worker, two pairs: one actor takes both, one after the other.
    run_sweep(["tiny", "twin"], [12], config, tmp_path / "serial", executor=RayExecutor(workers=1))
    assert len(created) == 2 + 2 + 1
    run_sweep(["tiny", "twin"], [12], config, tmp_path / "local")
    for name in ("tiny-12tok.json", "twin-12tok.json"):
        swept, local = (json.loads((tmp_path / out / name).read_text()) for out in ("ray", "local"))
        assert {k: v for k, v in swept.items() if k != "provenance"} == \
            {k: v for k, v in local.items() if k != "provenance"}


@pytest.mark.slow
def test_the_real_smollm2_fine_tune_swept_on_ray_equals_single_runs(local_ray, smollm2_ft, tmp_path):
    """Real weights (SmolLM2-135M-Instruct against the demo fine-tune): two actors, three shards, two
    lengths read off one capture; each run's JSON equals a single ``lens_compare.run`` at its length."""
    from lens_compare.pipeline.comparison import run_comparison
    from lens_compare.sweeps.ray_executor import RayExecutor

    config = RunConfig(prompts=PROMPTS[:3], batch_size=1, shard_size=1, bootstrap=50, logit_lens="final", top_tokens=3,
                       filler_text=" The history of science is long.", device="cpu")
    index = run_sweep(["smollm2-ft"], [8, 16], config, tmp_path / "ray", executor=RayExecutor(workers=2))
    assert sorted((e.tokens, e.status, e.captured_at) for e in index.entries.values()) == [(8, "done", 16),
                                                                                          (16, "done", 16)]
    for tokens in (8, 16):
        swept = json.loads((tmp_path / "ray" / f"smollm2-ft-{tokens}tok.json").read_text())
        # The length read off the capture has no steering check of its own (sweeps/prefix.py).
        steer = {"steer": False} if tokens == 8 else {}
        single = run_comparison(config.given({"pair": "smollm2-ft", "tokens": tokens, **steer})).to_dict()
        assert swept["provenance"]["token_ids"] == single["provenance"]["token_ids"]
        # The actors run one thread, this process two: float32 sums in another order move a norm of
        # tens by 1e-5 (norm_delta, a difference of two norms, by 1e-3 of itself).
        for key in single:
            if key != "provenance":
                assert_documents_close(swept[key], single[key], key, atol=1e-4)


def test_without_ray_the_executor_is_refused_in_one_line(monkeypatch):
    import sys

    from lens_compare.errors import ConfigError
    from lens_compare.sweeps.ray_executor import require_ray

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'lens_compare\[ray\]'"):
        require_ray()


def test_the_command_runs_a_sweep_on_ray(local_ray, pairs_file, tmp_path, monkeypatch, capsys):
    from lens_compare.sweep import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEV_MODE", raising=False)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")  # a relative path: the workers run elsewhere
    args = ["--pairs", "tiny", "--pairs-file", str(pairs_file), "--tokens", "6,12", "--batch-size", "2",
            "--shard-size", "2", "--bootstrap", "20", "--prompts-file", "prompts.txt",
            "--out", "sw", "-q"]
    assert main([*args, "--executor", "ray", "--workers", "2"]) == 0
    assert "prefix of the 12-token capture" in capsys.readouterr().out
    # --dry-run with --executor ray plans for the cluster's own nodes (here: this CPU machine).
    assert main(["--pairs", "qwen0.5b", "--tokens", "10", "--dry-run", "--executor", "ray"]) == 0
    out = capsys.readouterr().out
    assert "planned for the Ray cluster's largest node (1 node(s) like it): CPU" in out and "| qwen0.5b | 10 |" in out
    assert main([*args, "--executor", "ray", "--workers", "0"]) == 1
    assert "--workers 0: expected a whole number of at least 1" in capsys.readouterr().err
