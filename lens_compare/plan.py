"""``python -m lens_compare.plan``: what a pair needs and which strategy fits.

    python -m lens_compare.plan --pair qwen7b --tokens 250 --gpu a100-40gb
    python -m lens_compare.plan --pair llama70b --gpu h100 --count 4 --json
    python -m lens_compare.plan --base ./ckpt/config.json --sft ./ckpt_sft --here
    python -m lens_compare.plan --model-config ./ckpt/config.json --gpu 4090
    python -m lens_compare.plan --table

Exit status (as every lens_compare command): 0 when a strategy fits, 1 on a refused input
(one line on stderr), 3 when nothing fits (the plan still explains why).
"""

import argparse
import json

from lens_compare.cli import Parser, add_run_options, parse_or_exit, run_command
from lens_compare.config import RunConfig
from lens_compare.hardware.machine import catalog_machine, detect_machine
from lens_compare.hardware.planner import Plan, plan_pair
from lens_compare.hardware.steering import SteeringChoice, planned_steering
from lens_compare.hardware.timing import run_cost
from lens_compare.util.choices import DTYPES, STRATEGIES

NOTHING_FITS = 3


def _parser() -> Parser:
    p = Parser(prog="python -m lens_compare.plan", description=__doc__.split("\n")[0])
    add_run_options(p, ["pair", "base_model", "sft_model", "steer", "steer_layers", "steer_alphas"])
    p.add_argument("--model-config", metavar="CONFIG_JSON",
                   help="one model's config.json (or its directory), planned for both models")
    p.add_argument("--tokens", type=int, default=250, help="tokens per prompt (default 250)")
    p.add_argument("--n-prompts", type=int, default=1, metavar="N", help="number of prompts (default 1)")
    p.add_argument("--gpu", default="H100 SXM 80GB", help="GPU type: a gpus.json key or alias (h100, 4090, a100-40gb)")
    p.add_argument("--count", type=int, default=1, help="GPUs of that type in the machine (default 1)")
    p.add_argument("--dtype", choices=[*DTYPES, "fp8"],
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
        from lens_compare.models.pairs import get_pair

        spec = get_pair(args.pair)
        if spec.base_dtype or spec.sft_dtype:
            return None
    return RunConfig().dtype


def _plan(args: argparse.Namespace) -> int:
    if args.table:
        from lens_compare.hardware.seed_table import render_table

        print(render_table())
        return 0
    base, sft = args.base_model, args.sft_model
    if args.model_config:
        base = sft = args.model_config
    machine = detect_machine() if args.here else catalog_machine(args.gpu, args.count, args.host_ram_gib)
    plan = plan_pair(
        args.pair, base=base, sft=sft, tokens=args.tokens, batch=args.n_prompts, dtype=_dtype(args),
        strategy=args.strategy, states=args.states, machine=machine,
    )
    alphas = args.steer_alphas or RunConfig().steer_alphas
    steering = planned_steering(plan, args.steer, tuple(args.steer_layers or ()), tuple(alphas))
    if args.json:
        print(json.dumps({**plan.to_dict(), "steering": steering.to_dict()}, indent=2))
    else:
        print(plan.explain())
        print(_steering_line(plan, steering))
    return 0 if plan.strategy else NOTHING_FITS


def _steering_line(plan: Plan, steering: SteeringChoice) -> str:
    """The steering check as a run would decide it, and the run's seconds and dollars with it."""
    line = f"steering check: {'on' if steering.on else 'off'} ({steering.reason})"
    if steering.on and plan.chosen is not None and plan.chosen.est_seconds is not None:
        seconds = plan.chosen.est_seconds + steering.added_seconds
        cost = run_cost(seconds, plan.machine)
        line += f"; the run with it ~{seconds:.0f} s" + (f", ~${cost:.4f}" if cost is not None else "")
    return line


def main(argv: list[str] | None = None) -> int:
    args = parse_or_exit(_parser(), argv)
    if isinstance(args, int):
        return args
    return run_command("lens_compare.plan", lambda: _plan(args))


if __name__ == "__main__":
    from lens_compare.cli import exit_with

    exit_with(main)
