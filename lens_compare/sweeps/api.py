"""``lens_compare.sweep(...)``: the sweep from Python, as ``python -m lens_compare.sweep`` runs it."""

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lens_compare.config import RunConfig
from lens_compare.errors import ConfigError
from lens_compare.models.pairs import load_pairs_file
from lens_compare.pipeline.api import config_values
from lens_compare.pipeline.preflight import memory_preflight
from lens_compare.plots import require_matplotlib
from lens_compare.results.saved import concat_runs
from lens_compare.sweeps.figures import save_sweep_figures
from lens_compare.sweeps.index import SweepIndex
from lens_compare.sweeps.local import Executor, run_here, run_sweep
from lens_compare.sweeps.pairs import expand_pairs
from lens_compare.util.outputs import check_output_dir, write_frame

logger = logging.getLogger("lens_compare")

# The seed's token lengths.
SEED_LENGTHS = (10, 50, 100, 250)


def parse_lengths(text: str | Sequence[int]) -> tuple[int, ...]:
    """``10,50,100,250`` (or a list) as distinct positive lengths, longest last.

    >>> parse_lengths("250,10,50")
    (10, 50, 250)
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        lengths = sorted({int(item) for item in items})
    except (TypeError, ValueError):
        raise ConfigError(f"--tokens {text!r}: expected comma-separated positive integers like 10,50,100,250") from None
    if not lengths or lengths[0] < 1:
        raise ConfigError(f"--tokens {text!r}: expected comma-separated positive integers like 10,50,100,250")
    return tuple(lengths)


def sweep_table(index: SweepIndex) -> Path | None:
    """``sweep.parquet`` (``sweep.csv`` without pyarrow): every done run's summary rows, with its
    pair and token length in front. None when no run is done."""
    done = [entry for _, entry in sorted(index.entries.items()) if entry.status == "done"]
    if not done:
        return None
    frame = concat_runs([index.folder / entry.json for entry in done])
    if "run" in frame:  # one pair at several lengths: name the length, not the position
        frame.insert(1, "tokens", [done[run].tokens for run in frame.pop("run")])
    else:
        frame.insert(1, "tokens", done[0].tokens)
    try:
        import pyarrow  # noqa: F401

        fmt = "parquet"
    except ImportError:
        fmt = "csv"
        logger.warning("pyarrow is not installed: writing sweep.csv (pip install 'lens_compare[parquet]' "
                       "for sweep.parquet)")
    return write_frame(index.folder / f"sweep.{fmt}", frame, fmt)


def sweep(pairs: str | Sequence[str], tokens: str | Sequence[int] = SEED_LENGTHS, *, out: str | Path = "outputs",
          plots: bool = False, executor: str = "local", workers: int = 1, ray_address: str | None = None,
          check_memory: bool = True, **options: Any) -> SweepIndex:
    """Every pair at every length into ``out``: a JSON per run, ``sweep.json`` (what became of each
    run), ``sweep.parquet`` (every run's summary rows). ``pairs``: keys, or ``"seed"`` / ``"all"``;
    ``options``: ``compare()``'s (``prompts=``, ``dtype=``, ...). ``plots``: also the study's figures
    (``sweep.heatmap.png``, ``sweep.curves.png``, ``sweep.costs.png``). Running it again redoes only
    what is missing. ``executor="ray"`` fans each capture's shards out over ``workers`` Ray actors
    (``ray_address``: a running cluster's, else a local Ray instance; ``out`` must be storage every
    node sees).

    >>> index = lens_compare.sweep("smollm2-ft,smollm2-sanity", [10, 50], prompts=["..."])  # doctest: +SKIP
    >>> print(index.table())                                                                 # doctest: +SKIP
    """
    values = config_values(None, options.pop("prompts", ()), options)
    config = RunConfig().given({**values, "output_dir": str(out)}, path="sweep()")
    return sweep_config(pairs, tokens, config, plots=plots, executor=executor, workers=workers,
                        ray_address=ray_address, check_memory=check_memory)


def sweep_config(pairs: str | Sequence[str], tokens: str | Sequence[int], config: RunConfig, *,
                 plots: bool = False, executor: str = "local", workers: int = 1, ray_address: str | None = None,
                 check_memory: bool = True) -> SweepIndex:
    """The sweep of ``pairs`` x ``tokens`` with every other option from ``config`` (its
    ``output_dir`` is the sweep's folder); what ``python -m lens_compare.sweep`` calls."""
    extra = load_pairs_file(config.pairs_file) if config.pairs_file else None
    keys = expand_pairs(pairs if isinstance(pairs, str) else ",".join(pairs), extra)
    lengths = parse_lengths(tokens)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ConfigError(f"--workers {workers!r}: expected a whole number of at least 1")
    if workers > 1 and executor != "ray":
        logger.warning("--workers %d is for --executor ray; the local executor runs one run at a time", workers)
    out = Path(config.output_dir)
    check_output_dir(out)
    if plots:
        require_matplotlib()
    runner: Executor = run_here
    if executor == "ray":
        from lens_compare.sweeps.ray_executor import RayExecutor

        runner = RayExecutor(workers, ray_address, check_memory=check_memory)
        runner.check_shared_storage(out)
        # The workers rebuild each run from its config in their own working directory.
        config = config.replace(**{key: str(Path(value).resolve()) for key, value in
                                   (("pairs_file", config.pairs_file), ("prompts_file", config.prompts_file))
                                   if value})
    elif executor != "local":
        raise ConfigError(f"--executor {executor!r}: expected local or ray")
    index = run_sweep(keys, lengths, config, out, preflight=memory_preflight if check_memory else None,
                      executor=runner)
    sweep_table(index)
    if plots:
        save_sweep_figures(index)
    return index
