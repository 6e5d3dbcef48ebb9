"""Planner estimate vs measured peak memory of the real run, on the CPU or a GPU.

Each case runs ``lens_compare.compare`` in a fresh child process.

- ``--device cpu`` (default): the child imports every library first, records VmRSS
  just before the call and VmHWM (peak RSS) after it, so the Python/torch baseline is
  excluded and only the run's increase is measured. There is no CUDA context; the GGUF
  Q4_1 weights are dequantized to the load dtype.
- ``--device cuda``: the peak as nvidia-smi would see it: ``max_memory_reserved`` (the
  caching allocator's high-water mark) plus what the process holds outside the
  allocator (CUDA context, cuBLAS/cuDNN handles), read as ``total - free`` from
  ``mem_get_info`` minus ``memory_reserved`` after the run. ``max_memory_allocated``
  (tensors only) is printed beside it.

Each pair runs under both strategies the pipeline has: 'sequential' (one model
loaded at a time) and 'resident' (both loaded, the default when they fit); the
estimate is the planner's peak for that strategy on the same kind of machine.

    python benchmarks/bench_planner_memory.py [--device cuda]   # last line: JSON, every case
"""

import argparse
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
GIB = 2**30
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024 / GIB
pair, dtype, tokens, strategy, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
kw = {} if dtype == "None" else {"dtype": dtype}
prompt = "The history of science is full of questions that took centuries to answer. " * 40
base = status("VmRSS")
lens_compare.compare(pair, prompts=[prompt], tokens=tokens, device=device, strategy=strategy, **kw)
if device == "cpu":
    print(json.dumps({"measured_gib": status("VmHWM") - base}))
else:
    free, total = torch.cuda.mem_get_info()
    outside_allocator = (total - free - torch.cuda.memory_reserved()) / GIB
    print(json.dumps({"measured_gib": torch.cuda.max_memory_reserved() / GIB + outside_allocator,
                      "max_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                      "outside_allocator_gib": outside_allocator}))
"""


def estimate(pair: str, dtype: str | None, tokens: int, strategy: str, device: str) -> float:
    from lens_compare.hardware import Machine, detect_machine, plan_pair

    machine = Machine("cpu", 1, 1e6, 1e6) if device == "cpu" else detect_machine().with_count(1)
    plan = plan_pair(pair, tokens=tokens, dtype=dtype, machine=machine, with_cheapest=False)
    return plan.strategies[strategy].peak_gib_per_gpu


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    device = parser.parse_args().device
    results = []
    for pair, dtype, tokens, strategy in CASES:
        child = subprocess.run([sys.executable, "-c", CHILD, pair, str(dtype), str(tokens), strategy, device],
                               capture_output=True, text=True, check=False)
        if child.returncode != 0:
            print(child.stderr[-3000:], file=sys.stderr)
            results.append({"case": pair, "strategy": strategy, "error": f"child exited {child.returncode}"})
            continue
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        est = estimate(pair, dtype, tokens, strategy, device)
        results.append({"case": pair, "strategy": strategy, "dtype": dtype, "tokens": tokens,
                        "estimated_gib": round(est, 4),
                        **{k: round(v, 4) for k, v in measured.items()},
                        "ratio": round(est / measured["measured_gib"], 3)})
        print(f"{pair} ({strategy}): estimated {est:.3f} GiB, measured {measured['measured_gib']:.3f} GiB",
              file=sys.stderr)
    print(json.dumps({"device": device, "cases": results}))
    return 0 if all("ratio" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
