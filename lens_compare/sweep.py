"""``python -m lens_compare.sweep --pairs KEY,KEY --tokens 10,50,100,250 [run options]``: every
pair at every length, one after another on this machine, each with the strategy the planner picks.

    python -m lens_compare.sweep --pairs smollm2-ft,smollm2-sanity --tokens 10,50 --prompts-file p.txt
    python -m lens_compare.sweep --pairs seed --tokens 10,50,100,250 --dry-run --gpu h100 --count 8

Writes, under ``--out``: a JSON per run (``<pair>-<N>tok.json``), ``sweep.json`` (every run:
done, failed with its reason, or refused by the planner), ``sweep.parquet`` (every run's summary
rows) and, with ``--plots``, the study's figures. The same command again redoes only what is
missing. Exit code 0 when every run is done,
1 when any failed or was refused (or on a refused input), 130 when interrupted.

This module is also ``lens_compare.sweep(...)``, the same sweep from Python.
"""

import argparse
import sys
import types

from lens_compare.cli import Parser, add_run_options, given_run_options, parse_or_exit, run_command, setup_logging
from lens_compare.config import RunConfig, default_config_path, load_config_blocks, run_options
from lens_compare.errors import ConfigError
from lens_compare.models.pairs import load_pairs_file
from lens_compare.sweeps.api import SEED_LENGTHS, parse_lengths, sweep, sweep_config
from lens_compare.sweeps.pairs import expand_pairs

DEFAULT_GPU = "H100 SXM 80GB"

# What the sweep sets per run, instead of taking it as a flag.
PER_RUN = ("pair", "base_model", "sft_model", "tokens")


def parser() -> Parser:
    p = Parser(prog="python -m lens_compare.sweep", description=__doc__.splitlines()[0].strip("`: "))
    p.add_argument("--pairs", help="pair keys, comma-separated; 'seed' for the seed's 18 pairs, "
                                   "'all' for every registered pair (and --pairs-file's)")
    p.add_argument("--tokens", help="token lengths, comma-separated (default: the seed's 10,50,100,250); the "
                                    "shorter ones are read off the longest capture where their tokens come first")
    p.add_argument("--config", help="YAML file with a residual_compare: block (the run options) and/or a sweep: "
                                    "block (pairs, tokens, executor, workers, ray_address, plots); flags win")
    add_run_options(p, [field.name for field, _ in run_options() if field.name not in PER_RUN])
    p.add_argument("--plots", action="store_true", default=None,
                   help="also the study's figures: pairs x relative depth, each pair's curves by length, "
                        "seconds per run (sweep.*.png; needs the plots extra)")
    p.add_argument("--executor", choices=("local", "ray"),
                   help="local (default): one run after another here; ray: each capture's shards over Ray "
                        "actors (needs the ray extra; --out must be storage every node sees)")
    p.add_argument("--workers", type=int, metavar="N", help="--executor ray: actors per capture (default 1)")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="--executor ray: a running cluster (ray://host:10001 or auto); default: a local instance")
    p.add_argument("--dry-run", action="store_true",
                   help="plan every run (strategy, GPUs, memory, minutes, dollars) and the totals; load nothing")
    p.add_argument("--gpu", help="--dry-run: the GPU type to plan for (default: h100; with --executor ray, the "
                                 "cluster's own nodes)")
    p.add_argument("--count", type=int, default=1, help="--dry-run: GPUs of that type per machine (default 1)")
    p.add_argument("--here", action="store_true", help="--dry-run: plan for this machine instead")
    p.add_argument("--n-prompts", type=int, metavar="N",
                   help="--dry-run: prompts per run (default: the prompts given, else 1)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p


# A sweep file's ``sweep:`` keys: each one's type and its default where neither file nor flag gives it.
SWEEP_KEYS = {"pairs": ((str, list), None), "tokens": ((str, list, int), ",".join(map(str, SEED_LENGTHS))),
              "executor": ((str,), "local"), "workers": ((int,), 1), "ray_address": ((str,), None),
              "plots": ((bool,), False)}


def _sweep_block(block: dict, path: str) -> dict:
    """A sweep file's ``sweep:`` block, checked key by key."""
    unknown = sorted(set(block) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(f"config file {path!r}: sweep.{unknown[0]} is not a sweep key; expected one of "
                          f"{', '.join(SWEEP_KEYS)} (run options go in the residual_compare: block)")
    for key, value in block.items():
        types = SWEEP_KEYS[key][0]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"config file {path!r}: sweep.{key}: expected "
                              f"{' or '.join(t.__name__ for t in types)}, got {type(value).__name__} {value!r}")
    if isinstance(block.get("pairs"), list):
        block = {**block, "pairs": ",".join(map(str, block["pairs"]))}
    if isinstance(block.get("tokens"), list | int):
        tokens = block["tokens"] if isinstance(block["tokens"], list) else [block["tokens"]]
        block = {**block, "tokens": ",".join(map(str, tokens))}
    return block


def _settings(args: argparse.Namespace) -> tuple[RunConfig, argparse.Namespace]:
    """The run options (defaults, then the config file, then the flags) and the sweep's own settings
    (the file's ``sweep:`` block, then the flags)."""
    path = args.config or default_config_path()
    config, blocks = load_config_blocks(path, ("sweep",)) if path else (RunConfig(), {"sweep": {}})
    block = _sweep_block(blocks["sweep"], str(path))
    for key, (_, default) in SWEEP_KEYS.items():
        if getattr(args, key) is None:
            setattr(args, key, block.get(key, default))
    if not args.pairs:
        raise ConfigError("which pairs? give --pairs KEY,KEY,... ('seed' for the seed's 18 pairs) or pairs: in "
                          "the sweep: block of --config")
    config = config.given({key: value for key, value in given_run_options(args).items() if key not in PER_RUN})
    return config, args


def _dry_run(args: argparse.Namespace, config: RunConfig) -> int:
    from lens_compare.hardware.machine import catalog_machine, detect_machine
    from lens_compare.pipeline.prepare import read_prompts
    from lens_compare.sweeps.dry_run import plan_sweep

    extra = load_pairs_file(config.pairs_file) if config.pairs_file else None
    if args.here:
        machine = detect_machine()
    elif args.executor == "ray" and args.gpu is None:
        from lens_compare.sweeps.ray_executor import RayExecutor, cluster_machine

        executor = RayExecutor(args.workers, args.ray_address)
        machine, like = cluster_machine(executor.ray.nodes())
        print(f"planned for the Ray cluster's largest node ({like} node(s) like it): {machine.label}")
    else:
        machine = catalog_machine(args.gpu or DEFAULT_GPU, args.count, None)
    n_prompts = args.n_prompts or len(read_prompts(config)) or 1
    plan = plan_sweep(expand_pairs(args.pairs, extra), parse_lengths(args.tokens), n_prompts=n_prompts,
                      machine=machine, strategy=None if config.strategy == "auto" else config.strategy, extra=extra,
                      steer=config.steer, steer_layers=config.steer_layers, steer_alphas=config.steer_alphas)
    print(plan.table())
    return 0


def _sweep(args: argparse.Namespace) -> int:
    config, args = _settings(args)
    if args.dry_run:
        return _dry_run(args, config)
    from lens_compare.pipeline.prepare import read_prompts

    if not read_prompts(config):
        raise ConfigError("a sweep runs every pair on the same prompts: give --prompt TEXT (repeatable), "
                          "--prompts-file F or prompts: in --config (or plan it first with --dry-run)")
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # the log above the bar
        index = sweep_config(args.pairs, args.tokens, config, plots=args.plots, executor=args.executor,
                             workers=args.workers, ray_address=args.ray_address)
    print(index.table())
    return 0 if all(entry.status == "done" for entry in index.entries.values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_or_exit(parser(), argv)
    if isinstance(args, int):
        return args
    setup_logging(args.quiet)
    return run_command("lens_compare.sweep", lambda: _sweep(args))


class _CallableModule(types.ModuleType):
    """``lens_compare.sweep`` is this command's module once imported, and the function before: both
    call the sweep."""

    def __call__(self, *args, **kwargs):
        return sweep(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule


if __name__ == "__main__":
    from lens_compare.cli import exit_with

    exit_with(main)
