"""What the difference lens's top positions cost, against the lens's own per-token sums, on a shared machine.

The top positions add two steps to a run: while a shard's states are in hand, each token's unit
difference is spilled (``unit_differences``, at every lens layer), and once δ is known the spill is
ranked (``rank_positions``); a CLI run also writes the spill to its run folder and reads it back.
This times each step, interleaved with the difference lens's sums (``shard_sums``, whose cost on a
quiet machine the overhead benchmark measures), on states shaped as the overhead benchmark's run
(SmolLM2: 30 layers, d_model 576; 4 prompts x 250 tokens; classes rest and first_content), random
but for the shape. Each figure is the minimum over the repeats, the least disturbed by other
processes, and also given as a multiple of the sums' minimum: those ratios hold on a busy machine.

    python benchmarks/bench_positions.py [--repeats 15] [--layers 30] [--prompts 4] [--tokens 250] [--d-model 576]

Prints one JSON line: each step's min and median seconds and its ratio to the sums.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lens_compare.analyses.difference_lens import DifferenceLens, class_masks, shard_sums
from lens_compare.analyses.difference_positions import rank_positions, unit_differences
from lens_compare.engines.store import Kind, RunFolder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--d-model", type=int, default=576)
    parser.add_argument("--positions", type=int, default=5)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    shape = (args.layers + 1, args.prompts, args.tokens, args.d_model)
    base = torch.randn(shape, generator=generator)
    sft = base + 0.1 * torch.randn(shape, generator=generator)
    real = torch.ones(args.prompts, args.tokens, dtype=torch.bool)
    masks = class_masks(real, None, 5)
    lens = DifferenceLens(None, "bench", tuple(range(args.layers)), tuple(masks), torch.stack(list(masks.values())),
                          top_positions=args.positions)
    rows = tuple(range(1, args.layers + 1))
    token_ids = torch.randint(0, 1000, (args.prompts, args.tokens), generator=generator)
    tokens = lens.masks.any(dim=0)
    sums = shard_sums(base, sft, rows, lens.masks, real)

    def spill() -> dict[int, dict[str, torch.Tensor]]:
        return {layer: unit_differences(base[layer + 1], sft[layer + 1], tokens, 0) for layer in lens.layers}

    kept = spill()

    def rank():
        return rank_positions(lambda layer: [kept[layer]], sums, lens, token_ids)

    with tempfile.TemporaryDirectory() as tmp:
        folder = RunFolder(Path(tmp) / "run", {"bench": 1})

        def run_folder():
            """The spill written to a run folder, read back once for the ranking, dropped."""
            for layer, entry in kept.items():
                folder.put(Kind.DIFFERENCE_UNITS, entry, shard=0, state=layer + 1)
            for layer in lens.layers:
                folder.get(Kind.DIFFERENCE_UNITS, shard=0, state=layer + 1)
            folder.drop(Kind.DIFFERENCE_UNITS)

        steps = {"sums": lambda: shard_sums(base, sft, rows, lens.masks, real), "spill": spill, "rank": rank,
                 "run_folder_io": run_folder}
        times = {name: [] for name in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    floor = min(times["sums"])
    spill_mib = sum(entry["units"].numel() * 2 + entry["norms"].numel() * 20 for entry in kept.values()) / 2**20
    print(json.dumps({
        "layers": args.layers, "tokens": int(tokens.sum()), "d_model": args.d_model, "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(), "spill_mib": round(spill_mib, 1),
        **{name: {"min_s": round(min(found), 4), "median_s": round(statistics.median(found), 4),
                  "min_over_sums": round(min(found) / floor, 2)} for name, found in times.items()},
    }))


if __name__ == "__main__":
    main()
