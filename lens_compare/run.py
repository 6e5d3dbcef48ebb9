"""CLI: ``python -m lens_compare.run --pair llama8b [options]``.

Exit code 0 on success; on any refused input (bad flags included), a one-line reason on
stderr and exit code 1; 130 when interrupted (finished shards are kept: rerun to resume).
Config values come from ``--config PATH`` or, without it, from ``configs/dev_config.yaml`` when ``DEV_MODE=true`` and
``configs/prod_config.yaml`` otherwise; flags override them.
"""

import argparse
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

from lens_compare.cli import Parser, add_run_options, given_run_options, parse_or_exit, run_command, setup_logging
from lens_compare.config import RunConfig, default_config_path, load_config_file
from lens_compare.engines.store import STATE_KINDS, Kind, RunFolder
from lens_compare.models.pairs import builtin_pairs
from lens_compare.pipeline.comparison import Comparison, open_run_folder
from lens_compare.pipeline.preflight import memory_preflight
from lens_compare.pipeline.steps import check_spill_space, summary_line
from lens_compare.results.saved import load_run
from lens_compare.results.verdict import verdict
from lens_compare.results.writers import write_outputs
from lens_compare.util.outputs import check_export_formats, check_output_dir
from lens_compare.util.progress import one_bar

logger = logging.getLogger("lens_compare")


def parser() -> Parser:
    p = Parser(prog="python -m lens_compare.run", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with a residual_compare: block")
    add_run_options(p)
    p.add_argument("--plots", action="store_true",
                   help="also write the standard figures as PNG beside the JSON (needs the plots extra)")
    p.add_argument("--noise-floor-run", metavar="RUN_JSON",
                   help="a saved run (e.g. of smollm2-dtype) to read the drift against: a column of the "
                        "verdict and a band in the --plots figures")
    p.add_argument("--list-pairs", action="store_true", help="print the registered pairs and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, and no progress bars")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parser().parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The config file's values (or the built-in defaults) with the flags given applied on top."""
    path = args.config or default_config_path()
    config = load_config_file(path) if path else RunConfig()
    if path:
        how = "--config" if args.config else f"DEV_MODE={os.environ.get('DEV_MODE', '')!r} found it in ./configs"
        logger.info("config file: %s (%s); its values replace the built-in defaults, flags replace both",
                    path, how)
    else:
        logger.info("config file: none; built-in defaults (lens_compare.config.RunConfig), flags replace them")
    return config.given(given_run_options(args))


def _log_folder(folder: RunFolder, comparison: Comparison) -> None:
    count = comparison.plan().layout.count
    found = count - len(comparison.missing_shards(folder))
    spilled = len(folder.keys(Kind.STATES, role="base"))
    if found == count and comparison.missing_readings(folder):
        state = "; all finished but the difference lens's readings: loading the heads for them"
    elif found == count:
        state = "; all finished: assembling the outputs without loading a model"
    else:
        state = "; resuming" if found or spilled else ""
    logger.info("run folder %s: %d of %d shard(s) already finished%s%s", folder.path, found, count,
                f", {spilled} base shard(s) spilled" if spilled else "", state)


def _output_stem(folder: RunFolder, out_dir: Path, pair: str, seconds: float, nothing_pending: bool
                 ) -> tuple[Path, float, bool]:
    """One set of outputs per run folder: a rerun that only reassembles (or resumes) writes the same
    files again, under the stem of the folder's first outputs, instead of a new set. Returns the
    stem, the run's seconds in all, and whether nothing ran this time."""
    earlier = folder.get(Kind.OUTPUTS) if folder.has(Kind.OUTPUTS) else None
    reused = earlier is not None and nothing_pending
    if earlier is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        earlier = {"stem": f"lens_compare_{pair}_{stamp}", "seconds": 0.0}
    run_seconds = earlier["seconds"] if reused else earlier["seconds"] + seconds
    folder.put(Kind.OUTPUTS, {"stem": earlier["stem"], "seconds": run_seconds})
    return out_dir / earlier["stem"], run_seconds, reused


def _run(args: argparse.Namespace, opened: list[RunFolder]) -> int:
    if args.list_pairs:
        for key, spec in builtin_pairs().items():
            print(f"{key:16s} {spec.base}  <->  {spec.sft}")
        return 0
    config = resolve_config(args)
    logger.info("config (the values that differ from the built-in defaults; the JSON's provenance has all): %s",
                ", ".join(f"{key}={value!r}" for key, value in config.differences().items()) or "none")
    out_dir = Path(config.output_dir)
    check_output_dir(out_dir)
    check_export_formats(config.export)
    if args.plots:
        from lens_compare.plots import require_matplotlib

        require_matplotlib()
    floor = load_run(args.noise_floor_run) if args.noise_floor_run else None
    comparison = Comparison(config, preflight=memory_preflight, held_in_memory=False)
    planned = comparison.plan()
    check_spill_space(planned.run, planned.job, planned.execution, out_dir)
    folder = open_run_folder(comparison, out_dir)
    opened.append(folder)
    _log_folder(folder, comparison)
    nothing_pending = not comparison.pending(folder)
    seconds = comparison.run(folder)
    logger.info("assembling the result from %d shard(s): per-layer aggregates%s", planned.layout.count,
                f" with {config.bootstrap} bootstrap resamples each" if config.bootstrap else "")
    result = comparison.assemble(folder)
    if floor is None:  # --noise-floor-run names another run's floor; else this run's own, if measured
        floor = result.noise_floor
    stem, run_seconds, reused = _output_stem(folder, out_dir, result.provenance.pair, seconds, nothing_pending)
    if reused:
        logger.info("every shard was already in the run folder: its outputs are rewritten in place (%s.*), "
                    "not written again under a new name", stem)
    for path in write_outputs(result, config, stem, comparison.plan().job, folder):
        print(path)
    if args.plots:
        from lens_compare.plots import save_standard_figures

        logger.info("drawing the figures")
        for path in save_standard_figures(result, stem, noise_floor=floor):
            print(path)
    if not config.save_residuals:
        for kind in STATE_KINDS:
            folder.drop(kind)
    logger.info("verdict:\n%s", verdict(result, noise_floor=floor))
    planned = comparison.plan()
    logger.info(summary_line(planned.run, planned.execution, planned.job, seconds, run_seconds if reused else None))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_or_exit(parser(), argv)
    if isinstance(args, int):
        return args
    setup_logging(args.quiet)
    opened: list[RunFolder] = []

    def kept() -> str:
        if not opened:
            return "; no output was written"
        return (f"; finished shards (and a streamed run's finished blocks) are kept in {opened[0].path}: "
                "run the same command again to resume")

    if not args.quiet:
        return run_command("lens_compare.run", lambda: _run(args, opened), kept)
    with one_bar():  # -q: no progress bar at all (lens_compare's, or the libraries' weight loads)
        return run_command("lens_compare.run", lambda: _run(args, opened), kept)


if __name__ == "__main__":
    from lens_compare.cli import exit_with

    exit_with(main)
