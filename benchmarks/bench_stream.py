"""Layer-streamed capture (``--strategy stream``) against the resident TransformerBridge capture.

The float32 SmolLM2-135M-Instruct pair as two safetensors checkpoints (built as in
``bench_strategies.py``: the GGUF dequantized once, the second copy's final norm scaled
by 1.001). Each case runs ``lens_compare`` on ``--prompts`` prompts of 250 tokens, batch
8, in a fresh child process that imports every library first, records VmRSS, runs, and
reports VmHWM (peak RSS) minus that baseline and the wall time of the call. Cases run
interleaved, ``--repeats`` times (medians). Printed as one JSON line:

- ``bytes_read_ratio``: bytes the stream read from both checkpoints ÷ their size on disk,
  counted by the checkpoint reader; at ``--prompts`` and at ``--many`` prompts (target
  <= 1.02 whatever the prompt count);
- ``peak_ratio``: the streamed run's peak RSS above baseline ÷ the resident run's
  (target <= 0.35);
- ``time_ratio``: streamed wall ÷ resident wall (target <= 1.5 on the 2-core CPU);
- ``max_abs_diff``: the largest difference between the two runs' residual states, from
  one more pair of runs that keep them (``keep_residuals``), unmeasured.

    python benchmarks/bench_stream.py                # last line: JSON
    python benchmarks/bench_stream.py --device cuda  # peak = torch.cuda.max_memory_allocated
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_strategies import make_checkpoints  # noqa: E402

TOKENS = 250
BATCH = 8

CHILD = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers, transformer_lens.model_bridge, safetensors, accelerate  # noqa: F401 (baseline)
import lens_compare
from lens_compare.pipeline import comparison
from lens_compare.models.checkpoint import SafetensorsCheckpoint
GIB = 2**30
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024 / GIB
base, sft, strategy, device, tokens, prompts, batch, keep = sys.argv[1:9]
readers = []
original = SafetensorsCheckpoint.open.__func__
def counting(cls, ref):
    reader = original(cls, ref)
    readers.append(reader)
    return reader
SafetensorsCheckpoint.open = classmethod(counting)
text = "The history of science is full of questions that took centuries to answer. " * 40
config = lens_compare.RunConfig(base_model=base, sft_model=sft,
                                prompts=tuple(f"{i}. {text}" for i in range(int(prompts))),
                                tokens=int(tokens), device=device, strategy=strategy, batch_size=int(batch))
before = status("VmRSS")
start = time.perf_counter()
result = comparison.run_comparison(config, keep_residuals=keep == "1")
seconds = time.perf_counter() - start
out = {"seconds": seconds, "schedule": result.provenance["schedule"],
       "peak_gib": status("VmHWM") - before if device == "cpu" else torch.cuda.max_memory_allocated() / GIB}
if readers:
    out["bytes_read_ratio"] = sum(r.bytes_read for r in readers) / sum(r.total_bytes for r in readers)
if keep == "1":
    path = os.environ["BENCH_RESIDUALS"]
    torch.save([r.values for r in result.residuals], path)
print(json.dumps(out))
"""


def run_case(base: Path, sft: Path, strategy: str, device: str, prompts: int, keep: Path | None = None) -> dict:
    env = {**os.environ, "BENCH_RESIDUALS": str(keep or "")}
    argv = [sys.executable, "-c", CHILD, str(base), str(sft), strategy, device, str(TOKENS), str(prompts),
            str(BATCH), "1" if keep else "0"]
    child = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    if child.returncode != 0:
        print(child.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{strategy} child exited {child.returncode}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--work", help="folder for the checkpoints (default: a temporary one)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--many", type=int, default=64, help="prompt count for the second bytes-read figure")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lens_compare_bench_"))
    base, sft = make_checkpoints(work)
    runs: dict[str, list[dict]] = {"resident": [], "stream": []}
    for _ in range(args.repeats):
        for strategy in runs:
            runs[strategy].append(run_case(base, sft, strategy, args.device, args.prompts))
            print(f"{strategy}: {runs[strategy][-1]}", file=sys.stderr)
    many = run_case(base, sft, "stream", args.device, args.many)
    kept = {s: work / f"residuals-{s}.pt" for s in runs}
    for strategy, path in kept.items():
        run_case(base, sft, strategy, args.device, args.prompts, keep=path)
    import torch

    resident, streamed = (torch.load(kept[s]) for s in ("resident", "stream"))
    max_abs_diff = max(float((a - b).abs().max()) for a, b in zip(resident, streamed, strict=True))
    median = {s: {k: statistics.median(r[k] for r in got) for k in ("seconds", "peak_gib")} for s, got in runs.items()}
    summary = {
        "device": args.device, "tokens": TOKENS, "prompts": args.prompts, "batch": BATCH,
        "bytes_read_ratio": {str(args.prompts): round(runs["stream"][0]["bytes_read_ratio"], 5),
                             str(args.many): round(many["bytes_read_ratio"], 5)},
        "peak_ratio": round(median["stream"]["peak_gib"] / median["resident"]["peak_gib"], 3),
        "time_ratio": round(median["stream"]["seconds"] / median["resident"]["seconds"], 3),
        "max_abs_diff": max_abs_diff,
        "peak_gib": {s: round(m["peak_gib"], 4) for s, m in median.items()},
        "wall_s": {s: round(m["seconds"], 2) for s, m in median.items()},
        "wall_s_runs": {s: [round(r["seconds"], 2) for r in got] for s, got in runs.items()},
        "stream_wall_s_many": round(many["seconds"], 2),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
