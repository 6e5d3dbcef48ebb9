"""Planner estimate vs measured peak memory of the real run, on the CPU.

Each case runs ``lens_compare.compare`` in a fresh child process that imports every
library first, records VmRSS just before the call and VmHWM (peak RSS) after it, so
the Python/torch baseline is excluded and only the run's increase is measured. On the
CPU there is no CUDA context; the GGUF Q4_1 weights are dequantized to the load dtype.
Each pair runs under both strategies the pipeline has: 'sequential' (one model in RAM
at a time) and 'resident' (both loaded, the default when they fit); the estimate is
the planner's peak for that strategy on a CPU machine.

    python benchmarks/bench_planner_memory.py    # last line: JSON with every case
"""

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

# dtype None: the pair's own (smollm2-dtype loads base float32, sft bfloat16).
CASES = [
    (pair, dtype, 250, strategy)
    for strategy in ("sequential", "resident")
    for pair, dtype in (("smollm2-sanity", "float32"), ("smollm2-dtype", None))
]

CHILD = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers, transformer_lens.model_bridge, gguf  # noqa: F401  (baseline)
import lens_compare
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024 / 2**30
pair, dtype, tokens, strategy = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
kw = {} if dtype == "None" else {"dtype": dtype}
prompt = "The history of science is full of questions that took centuries to answer. " * 40
base = status("VmRSS")
lens_compare.compare(pair, prompts=[prompt], tokens=tokens, device="cpu", strategy=strategy, **kw)
print(json.dumps({"measured_gib": status("VmHWM") - base}))
"""


def estimate(pair: str, dtype: str | None, tokens: int, strategy: str) -> float:
    from lens_compare.hardware import Machine, plan_pair

    plan = plan_pair(pair, tokens=tokens, dtype=dtype, machine=Machine("cpu", 1, 1e6, 1e6),
                     with_cheapest=False)
    return plan.strategies[strategy].peak_gib_per_gpu


def main() -> int:
    results = []
    for pair, dtype, tokens, strategy in CASES:
        child = subprocess.run([sys.executable, "-c", CHILD, pair, str(dtype), str(tokens), strategy],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            results.append({"case": pair, "strategy": strategy, "error": f"child exited {child.returncode}"})
            continue
        measured = json.loads(child.stdout.strip().splitlines()[-1])["measured_gib"]
        est = estimate(pair, dtype, tokens, strategy)
        results.append({"case": pair, "strategy": strategy, "dtype": dtype, "tokens": tokens,
                        "estimated_gib": round(est, 4),
                        "measured_gib": round(measured, 4), "ratio": round(est / measured, 3)})
        print(f"{pair} ({strategy}): estimated {est:.3f} GiB, measured {measured:.3f} GiB", file=sys.stderr)
    print(json.dumps({"device": "cpu", "cases": results}))
    return 0 if all("ratio" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
