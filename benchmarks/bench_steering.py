"""What the steering check costs per steered layer and α, against one base forward.

On the smollm2-ft pair (SmolLM2-135M-Instruct and its demo fine-tune, float32, both loaded once
through lens_compare's loading), over the same prompts and batches, interleaved in one process:

- forward: the base model once over every prompt through TransformerBridge, returning logits
  (what one steered forward is, without its hook);
- check_small: the steering check's sums of one unit (``engines.steering.unit_sums``) at one layer
  and one α: the SFT forward, the base forward and one steered forward, with the KL and top-1
  arithmetic over the full vocabulary;
- check_large: the same at ``--layers`` x ``--alphas`` (3 x 3 by default: nine steered forwards).

The marginal cost of one (layer, α) is (check_large - check_small) / (nine - one) steered forwards;
``per_steer_ratio`` is that over forward (medians; target <= 1.2: the issue's "within 1.2x of one
base forward"). ``whole_per_steer_ratio`` spreads the whole large check (the SFT and unsteered base
forwards included) over its nine steered forwards. δ is a fixed random vector of the model's
width: the cost does not depend on it. Prints one JSON line.

    python benchmarks/bench_steering.py [--repeats 5] [--prompts 4] [--tokens 250] [--threads 0]
"""

import argparse
import dataclasses
import json
import statistics
import time

import torch

from lens_compare import RunConfig
from lens_compare.analyses.steering import Steering
from lens_compare.engines.loaded import loaded
from lens_compare.engines.steering import _logits, unit_sums
from lens_compare.engines.store import MemoryStore
from lens_compare.pipeline.comparison import Comparison
from lens_compare.pipeline.steps import build_demo_checkpoints

FILLER = "The committee met on Tuesday to review the budget, the schedule and the staffing plan. "


def _timed(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--layers", default="7,14,22")
    parser.add_argument("--alphas", default="0.5,1,2")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layers = tuple(int(x) for x in args.layers.split(","))
    alphas = tuple(float(x) for x in args.alphas.split(","))
    prompts = tuple(f"Question {i}: {FILLER}" for i in range(args.prompts))
    config = RunConfig(pair="smollm2-ft", prompts=prompts, tokens=args.tokens, filler_text=FILLER,
                       batch_size=args.prompts, logit_lens="final", bootstrap=0, steer=True, steer_layers=layers,
                       steer_alphas=alphas, dtype="float32")
    planned = Comparison(config).plan()
    build_demo_checkpoints(planned.run)
    job = planned.job
    small = dataclasses.replace(job, steering=Steering(layers[-1:], alphas[-1:]))
    large = dataclasses.replace(job, steering=Steering(layers, alphas))
    store = MemoryStore()
    base_side, sft_side = job.sides
    with loaded(job, base_side, store) as base, loaded(job, sft_side, store) as sft, torch.inference_mode():
        vocab = min(base.bridge.cfg.d_vocab, sft.bridge.cfg.d_vocab)
        width = base.bridge.cfg.d_model
        delta = torch.randn(len(layers), width, generator=torch.Generator().manual_seed(0))
        ids, real = job.shard_inputs(0)

        def forward():
            for start in range(0, ids.shape[0], job.batch_size):
                _logits(base.bridge, ids[start:start + job.batch_size], real[start:start + job.batch_size], vocab, [])

        def sft_logits(unit, start, batch_ids, batch_real):
            return _logits(sft.bridge, batch_ids, batch_real, sft.bridge.cfg.d_vocab, [])

        def check(which, delta):
            return lambda: unit_sums(which, 0, base.bridge, sft_logits, delta, vocab)

        cases = {"forward": forward, "check_small": check(small, delta[-1:]), "check_large": check(large, delta)}
        for call in cases.values():  # warm-up
            call()
        seconds = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, call in cases.items():
                seconds[name].append(_timed(call))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    steered = len(layers) * len(alphas)
    marginal = (median["check_large"] - median["check_small"]) / (steered - 1)
    print(json.dumps({
        "per_steer_ratio": round(marginal / median["forward"], 3),
        "whole_per_steer_ratio": round(median["check_large"] / steered / median["forward"], 3),
        "seconds": {name: round(value, 3) for name, value in median.items()},
        "tokens": int(real.sum()), "steered_forwards": steered, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
