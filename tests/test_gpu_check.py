"""The prepared GPU checks (benchmarks/gpu_check.py) run end to end on the CPU, shrunk (--smoke)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    """One JSON line per check, each ok, written to $OUT too; the script never needs the network or
    the SmolLM2 package (the device machine has neither): its models and tokenizer are made on the spot."""
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--smoke",
                           "--work", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    names = [r["check"] for r in records]
    assert names == ["machine", "capture_parity", "planner_peak", "capture_overhead", "lens_gflops", "stream_big",
                     "local_run_guard"]
    assert all(r["ok"] for r in records), [r for r in records if not r["ok"]]
    parity = records[1]
    assert parity["float32_max_relative_l2"] <= 1e-6 and parity["bfloat16_equals_hf_hidden_states"]
    assert [case["strategy"] for case in records[2]["cases"]] == ["resident", "stream"]
    assert records[4]["lens_gflops"] > 0 and records[5]["cosine_last"] == 1.0
    assert "CUDA" in records[6]["approved"]  # no GPU here: the guard refuses, naming why
    written = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert written == records


def test_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "torch sees no CUDA GPU here; use --device cpu --smoke" in done.stderr
