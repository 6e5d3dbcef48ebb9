"""``python -m lens_compare.plan``: what a pair needs and which strategy fits.

    python -m lens_compare.plan --pair qwen7b --tokens 250 --gpu a100-40gb
    python -m lens_compare.plan --pair llama70b --gpu h100 --count 4 --json
    python -m lens_compare.plan --base ./ckpt/config.json --sft ./ckpt_sft --here
    python -m lens_compare.plan --table

Exit status: 0 when a strategy fits, 1 when nothing fits (the plan still explains
why), 2 on bad input.
"""

import argparse
import json
import sys

from lens_compare.errors import LensCompareError
from lens_compare.hardware.machine import catalog_machine, detect_machine
from lens_compare.hardware.planner import plan_pair
from lens_compare.hardware.strategies import STRATEGIES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lens_compare.plan", description=__doc__.split("\n")[0])
    p.add_argument("--pair", help="registered pair key (see python -m lens_compare.run --list-pairs)")
    p.add_argument("--base", help="base model: hub id, directory, config.json, .gguf or pkg: ref")
    p.add_argument("--sft", help="SFT model reference (same forms as --base)")
    p.add_argument("--config", help="one config.json (or directory) used for both models")
    p.add_argument("--tokens", type=int, default=250, help="tokens per prompt (default 250)")
    p.add_argument("--batch", type=int, default=1, help="number of prompts (default 1)")
    p.add_argument("--gpu", default="H100 SXM 80GB", help="GPU type: a gpus.json key or alias (h100, 4090, a100-40gb)")
    p.add_argument("--count", type=int, default=1, help="GPUs of that type in the machine (default 1)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "fp8"],
                   help="weight precision for resident/sequential (default: the pair's, else bfloat16; "
                        "with --here, what lens_compare.run uses: float32)")
    p.add_argument("--strategy", choices=STRATEGIES, help="only consider this strategy")
    p.add_argument("--host-ram-gib", type=float, help="host RAM of the planned machine")
    p.add_argument("--states", type=int, help="residual states captured per model (default all L+1)")
    p.add_argument("--here", action="store_true", help="plan for this machine (CUDA devices, else CPU RAM)")
    p.add_argument("--table", action="store_true", help="render the seed's table with verdicts (markdown)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _dtype(args: argparse.Namespace) -> str | None:
    """``--dtype``; with ``--here`` and none given, what ``lens_compare.run`` would use on this
    machine (its default, unless the pair fixes its own dtypes)."""
    if args.dtype or not args.here:
        return args.dtype
    if args.pair:
        from lens_compare.pairs import get_pair

        spec = get_pair(args.pair)
        if spec.base_dtype or spec.sft_dtype:
            return None
    from lens_compare.config import RunConfig

    return RunConfig().dtype


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.table:
            from lens_compare.hardware.seed_table import render_table

            print(render_table())
            return 0
        base, sft = args.base, args.sft
        if args.config:
            base = sft = args.config
        machine = detect_machine() if args.here else catalog_machine(args.gpu, args.count, args.host_ram_gib)
        plan = plan_pair(
            args.pair, base=base, sft=sft, tokens=args.tokens, batch=args.batch, dtype=_dtype(args),
            strategy=args.strategy, states=args.states, machine=machine,
        )
    except LensCompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.explain())
    return 0 if plan.strategy else 1


if __name__ == "__main__":
    from lens_compare.cli import exit_with

    exit_with(main)
