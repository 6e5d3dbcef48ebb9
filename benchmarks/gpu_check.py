"""The CUDA checks, in one prepared command for the few minutes a lent GPU gives (about 8 on one H100).

Nothing is downloaded: every model is made on the spot with random weights, from the architecture
facts lens_compare ships (``lens_compare/data/model_configs.json``), with a tokenizer trained
locally (``tests/fixtures/tiny_models.build_tokenizer``). In order of importance:

1. ``capture_parity``: the capture on CUDA against the CPU float32 capture of the same checkpoint,
   a 2-block model of Llama-3.1-8B's width (vocabulary cut to 32,768): float32 (TF32 off) within
   1e-3 relative, bfloat16 within 5e-2; and the bfloat16 capture against HF's own
   ``hidden_states`` on CUDA, bit for bit.
2. ``planner_peak``: the planner's peak against ``torch.cuda.max_memory_allocated`` for resident,
   sequential, nf4 (where bitsandbytes is installed) and stream, each in a fresh process
   (``benchmarks/bench_planner_memory.py --device cuda`` on that checkpoint and a perturbed copy).
3. ``capture_overhead``: ``benchmarks/bench_overhead.py --mode capture --device cuda --dtype bfloat16``
   on that checkpoint.
4. ``lens_gflops``: the logit lens in bfloat16 at Llama-3.1-8B's head (128,256 x 4,096) against one
   plain product of the same shape.
5. ``stream_big``: ``benchmarks/bench_stream_big.py`` on 8 full-width Llama-3.1-70B blocks under a
   quarter of the GPU's memory.
6. ``local_run_guard``: the seed's guard on the real card: it approves the card it names (with its
   log line) and refuses another card, too little memory and an unlisted pair.

Each check prints one JSON line (``{"check": ..., "ok": ..., "seconds": ..., ...}``) and writes it to
``$OUT/gpu_check.jsonl`` when ``OUT`` is set; a check that fails or times out says why and the
next one runs. ``--smoke`` shrinks every size (a 16th of the widths, 2 blocks) so the whole script
runs on a CPU in about a minute (``--device cpu --smoke``: the test suite runs it so).

    python benchmarks/gpu_check.py                       # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --smoke  # anywhere
    python benchmarks/gpu_check.py --only 1,4
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def report(record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "gpu_check.jsonl", "a") as handle:
            handle.write(line + "\n")


def checkpoints(work: Path, smoke: bool) -> tuple[Path, Path]:
    """A random 2-block checkpoint of Llama-3.1-8B's width (a 16th with ``smoke``) and a copy whose
    block 1 differs, with a tokenizer trained here."""
    import torch
    from bench_stream_big import build_checkpoint
    from safetensors.torch import load_file, save_file

    from tests.fixtures.tiny_models import build_tokenizer

    tokenizer = work / "tokenizer"
    if not tokenizer.is_dir():
        build_tokenizer(tokenizer)
    base = build_checkpoint(work / "base", "meta-llama/Llama-3.1-8B", 2, 16 if smoke else 1, str(tokenizer),
                            vocab=2048 if smoke else 32768)
    sft = work / "sft"
    if not sft.is_dir():
        import shutil

        shutil.copytree(base, sft)
        generator = torch.Generator().manual_seed(1)
        for file in sft.glob("model-*.safetensors"):
            tensors = load_file(str(file))
            if any(".layers.1." in key for key in tensors):
                tensors = {key: (value.float() + 0.02 * torch.randn(value.shape, generator=generator)
                                 * value.float().std()).to(value.dtype) if ".layers.1." in key else value
                           for key, value in tensors.items()}
                save_file(tensors, str(file), {"format": "pt"})
    return base, sft


def capture_parity(args, base: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lens_compare.capture.states import boot_bridge, capture_states
    from lens_compare.models.load_options import LoadOptions
    from lens_compare.models.loading import load_config, load_hf_model, resolve_ref
    from lens_compare.util.hooks import states_for_layers

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = resolve_ref(str(base))
    config = load_config(ref)
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = ["The history of science is full of questions that took centuries to answer. " * 6,
             "Water boils at one hundred degrees at sea level and freezes at zero."]
    encoded = tokenizer(texts, padding=True, return_tensors="pt", padding_side="right")
    ids, real = encoded["input_ids"], encoded["attention_mask"].bool()
    states = states_for_layers(tuple(range(config.num_hidden_layers)))

    def capture(dtype: str, device: str):
        options = LoadOptions(dtype, device)
        bridge = boot_bridge(load_hf_model(ref, config, options), ref, tokenizer, options)
        captured = capture_states(bridge, ids, real, states, batch_size=2, label=f"{device} {dtype}")
        del bridge
        return captured.values.float()

    reference = capture("float32", "cpu")
    out = {"states": len(states), "tokens": int(real.sum())}
    ok = True
    for dtype, tolerance in (("float32", 1e-3), ("bfloat16", 5e-2)):
        got = capture(dtype, args.device)
        # Per state, the relative L2 error over the real tokens.
        errors = [float((got[s][real] - reference[s][real]).norm() / reference[s][real].norm())
                  for s in range(len(states))]
        out[f"{dtype}_max_relative_l2"] = max(errors)
        ok &= max(errors) <= tolerance
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, attn_implementation="eager")
    model = model.to(args.device)
    with torch.no_grad():
        hidden = model(ids.to(args.device), attention_mask=real.long().to(args.device),
                       output_hidden_states=True).hidden_states
    bridged = capture("bfloat16", args.device)
    exact = all(torch.equal(bridged[s][real], hidden[s].float().cpu()[real]) for s in range(len(states) - 1))
    out["bfloat16_equals_hf_hidden_states"] = exact
    return {"ok": bool(ok and exact), **out}


def run_script(command: list[str], timeout: int) -> dict:
    """A benchmark script in a fresh process: its last JSON line, or why there is none."""
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ,
                               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"ok": False, "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ''}"}
    return {"ok": True, **json.loads(lines[-1])}


def planner_peak(args, base: Path, sft: Path) -> dict:
    # A smoke test plans and measures two of them (each case is a fresh process).
    strategies = "resident,stream" if args.smoke else \
        "resident,sequential,stream" + (",nf4" if _has("bitsandbytes") else "")
    found = run_script(["benchmarks/bench_planner_memory.py", "--device", args.device, "--base", str(base),
                        "--sft", str(sft), "--strategies", strategies, "--tokens", "64" if args.smoke else "250"],
                       timeout=args.timeout)
    if found.get("ok") and "cases" in found:
        found["ok"] = all("ratio" in case for case in found["cases"])
    return found


def capture_overhead(args, base: Path) -> dict:
    command = ["benchmarks/bench_overhead.py", "--mode", "capture", "--device", args.device, "--model", str(base),
               "--dtype", "bfloat16" if args.device.startswith("cuda") else "float32"]
    if args.smoke:
        command += ["--prompts", "4", "--batch", "2", "--tokens", "32", "--repeats", "2", "--no-peaks"]
    return run_script(command, timeout=args.timeout)


def lens_gflops(args) -> dict:
    import torch

    from lens_compare.analyses.logit_lens import chunk_tokens, logit_lens_metrics
    from lens_compare.capture.head import Head

    vocab, d_model, layers, tokens = (4096, 256, 4, 64) if args.smoke else (128256, 4096, 32, 2000)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    generator = torch.Generator().manual_seed(0)
    heads = {role: Head(torch.nn.RMSNorm(d_model).to(args.device, dtype).eval(),
                        (torch.randn(vocab, d_model, generator=generator) * 0.02).to(args.device, dtype), None)
             for role in ("base", "sft")}
    states = {role: {s: torch.randn(1, tokens, d_model, generator=generator).to(dtype) for s in range(layers + 1)}
              for role in heads}
    real = torch.ones(1, tokens, dtype=torch.bool)
    budget = 2**30

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def lens():
        logit_lens_metrics(heads, lambda role, s: states[role][s], tuple(range(layers)), layers, real, budget=budget)
        sync()

    chunk = min(tokens, chunk_tokens(vocab, budget, torch.tensor([], dtype=dtype).element_size()))
    x = torch.randn(chunk, d_model, generator=generator).to(args.device, dtype)

    def product():
        torch.nn.functional.linear(x, heads["base"].weight)
        sync()

    timings = {}
    for name, fn in (("lens", lens), ("matmul", product)):
        fn()
        start = time.perf_counter()
        repeats = 3
        for _ in range(repeats):
            fn()
        timings[name] = (time.perf_counter() - start) / repeats
    lens_flops = 2 * 2 * layers * tokens * vocab * d_model  # both heads at every layer (the finals' once are on top)
    result = {"vocab": vocab, "d_model": d_model, "layers": layers, "tokens": tokens, "dtype": str(dtype),
              "lens_gflops": lens_flops / timings["lens"] / 1e9,
              "matmul_gflops": 2 * chunk * vocab * d_model / timings["matmul"] / 1e9}
    result["ratio"] = result["lens_gflops"] / result["matmul_gflops"]
    return {"ok": True, **result}


def stream_big(args, work: Path) -> dict:
    command = ["benchmarks/bench_stream_big.py", "--device", args.device, "--tokenizer", str(work / "tokenizer"),
               "--work", str(work / "big")]
    command += ["--layers", "2", "--width-divisor", "16", "--prompts", "2", "--tokens", "32"] if args.smoke else \
        ["--layers", "8", "--memory-fraction", "0.25"]
    return run_script(command, timeout=args.timeout)


def local_run_guard(args, base: Path) -> dict:
    """The seed's local_run guard on this machine's card: it approves a pair run on the card it names
    (its name's last word, its memory) with the log line, and refuses a card it does not name, too
    little memory, and a pair it does not list. Without CUDA it refuses with its own reason."""
    from lens_compare.errors import HardwareError
    from lens_compare.hardware.local_run import LocalRunConfig, check_local_run, query_cuda_device

    gpu = query_cuda_device(0)

    def guard(**changes):
        block = {"enabled": True, "min_vram_gb": 1,
                 "require_gpu_name_substring": gpu.name.split()[-1] if gpu else "H100",
                 "allowed_pairs": [{"base": str(base), "sft": str(base), "dtype": "bfloat16"}], **changes}
        try:
            return check_local_run(LocalRunConfig.from_dict(block), str(base), str(base), gpu).log_line
        except HardwareError as error:
            return f"refused: {error}"

    out = {"approved": guard(), "other_card": guard(require_gpu_name_substring="RTX 2080"),
           "too_little_memory": guard(min_vram_gb=10_000), "unlisted_pair": guard(allowed_pairs=[])}
    if gpu is None:
        ok = all(value.startswith("refused") for value in out.values())
    else:
        ok = out["approved"].startswith("Local GPU execution enabled") and all(
            out[key].startswith("refused") for key in ("other_card", "too_little_memory", "unlisted_pair"))
    return {"ok": ok, **out}


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke, anywhere)")
    parser.add_argument("--smoke", action="store_true", help="every size shrunk: a minute on a CPU")
    parser.add_argument("--only", help="comma-separated check numbers (1-6), e.g. 1,4")
    parser.add_argument("--timeout", type=int, default=240, help="seconds each script-based check may take")
    parser.add_argument("--work", help="folder for the checkpoints (default: a temporary one)")
    args = parser.parse_args()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu --smoke")
    only = {int(n) for n in args.only.split(",")} if args.only else set(range(1, 7))
    work = Path(args.work or tempfile.mkdtemp(prefix="lens_compare_gpu_check_"))
    report({"check": "machine", "ok": True, "device": args.device, "smoke": args.smoke, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None})
    base = sft = None
    checks = [
        (1, "capture_parity", lambda: capture_parity(args, base)),
        (2, "planner_peak", lambda: planner_peak(args, base, sft)),
        (3, "capture_overhead", lambda: capture_overhead(args, base)),
        (4, "lens_gflops", lambda: lens_gflops(args)),
        (5, "stream_big", lambda: stream_big(args, work)),
        (6, "local_run_guard", lambda: local_run_guard(args, base)),
    ]
    failed = 0
    for number, name, check in checks:
        if number not in only:
            continue
        start = time.perf_counter()
        try:
            if base is None and number in (1, 2, 3, 6):
                base, sft = checkpoints(work, args.smoke)
            record = check()
        except subprocess.TimeoutExpired:
            record = {"ok": False, "error": f"timed out after {args.timeout} s"}
        except Exception as error:  # a failed check is reported, and the next one runs
            record = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "where": traceback.format_exc().strip().splitlines()[-3:]}
        failed += not record.get("ok")
        report({"check": name, **record, "seconds": round(time.perf_counter() - start, 1)})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
