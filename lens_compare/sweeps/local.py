"""The local executor: every pair of a sweep, one after another on this machine, each length
read off the longest capture it is a prefix of, each with the strategy the planner picks here.

Every capture keeps its run folder (shards, resume); every run gets its JSON
(``OUT/<pair>-<N>tok.json``) and an entry in ``OUT/sweep.json``. A pair that fails is recorded
with its one-line reason and the sweep goes on; the same call again redoes only what is missing.
"""

import logging
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from lens_compare.config import RunConfig
from lens_compare.engines.store import STATE_KINDS, RunFolder
from lens_compare.errors import HardwareError, LensCompareError
from lens_compare.pipeline.comparison import Comparison, PlannedRun, open_run_folder
from lens_compare.pipeline.steps import Preflight, check_spill_space
from lens_compare.results.result import ComparisonResult
from lens_compare.results.writers import write_outputs
from lens_compare.sweeps.index import SweepEntry, SweepIndex
from lens_compare.sweeps.prefix import PrefixView, capture_lengths
from lens_compare.util.units import GIB

logger = logging.getLogger("lens_compare")


def run_stem(out_dir: Path, pair: str, tokens: int) -> Path:
    return Path(out_dir) / f"{pair}-{tokens}tok"


def peak_gib(device: str) -> float:
    """This process's peak memory so far: the GPU's where the run used one, else host RSS."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / GIB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _failure(pair: str, tokens: int, error: BaseException) -> SweepEntry:
    status = "refused" if isinstance(error, HardwareError) else "failed"
    text = " ".join(str(error).split())
    reason = text if isinstance(error, LensCompareError) else f"{type(error).__name__}: {text}"
    return SweepEntry(pair, tokens, status, reason=reason)


def _plans(pair: str, lengths: Sequence[int], config: RunConfig, preflight: Preflight | None,
           index: SweepIndex) -> dict[int, Comparison]:
    """Each length's Comparison, planned (nothing loads); a length refused here is recorded."""
    comparisons = {}
    for tokens in lengths:
        comparison = Comparison(config.given({"pair": pair, "tokens": tokens}), preflight=preflight,
                                held_in_memory=False)
        try:
            comparison.plan()
        except Exception as error:  # recorded with its reason; the sweep goes on
            index.record(_failure(pair, tokens, error))
            continue
        comparisons[tokens] = comparison
    return comparisons


def _write(result: ComparisonResult, comparison: Comparison, folder: RunFolder, out_dir: Path, pair: str,
           tokens: int, captured_at: int, seconds: float) -> SweepEntry:
    planned = comparison.plan()
    stem = run_stem(out_dir, pair, tokens)
    write_outputs(result, comparison.config, stem, planned.job, folder)
    return SweepEntry(pair, tokens, "done", json=stem.with_suffix(".json").name, captured_at=captured_at,
                      strategy=planned.execution.strategy, seconds=round(seconds, 2),
                      peak_gib=round(peak_gib(planned.run.device), 3))


# Runs every missing shard of a capture into its run folder: ``comparison.run(folder)`` here,
# fanned out over Ray actors by ``lens_compare.sweeps.ray_executor.RayShards``.
RunShards = Callable[[Comparison, RunFolder], None]


def run_here(comparison: Comparison, folder: RunFolder) -> None:
    comparison.run(folder)


def _capture(pair: str, longest: int, served: list[int], comparisons: dict[int, Comparison], out_dir: Path,
             preflight: Preflight | None, index: SweepIndex, run_shards: RunShards, riders: tuple[int, ...]) -> None:
    """Run the capture at ``longest`` tokens and write every length it serves (``riders``: the
    shorter lengths read off it, done or not)."""
    capture = comparisons[longest]
    if riders and capture.plan().job.difference is not None:
        # The difference lens's sums cover whole prompts: the capture also sums each rider's first positions.
        capture = Comparison(capture.config.replace(prefix_lengths=riders), preflight=preflight, held_in_memory=False)
    planned: PlannedRun = capture.plan()
    check_spill_space(planned.run, planned.job, planned.execution, out_dir)
    folder = open_run_folder(capture, out_dir)
    start = time.perf_counter()
    run_shards(capture, folder)
    seconds = time.perf_counter() - start
    for tokens in sorted(served, reverse=True):
        try:
            if tokens == longest:
                entry = _write(capture.assemble(folder), capture, folder, out_dir, pair, tokens, longest, seconds)
            else:
                # The shorter run with the capture's shards, read through a view cut to its length.
                config = comparisons[tokens].config.replace(shard_size=planned.layout.size)
                prefix = Comparison(config, preflight=preflight, held_in_memory=False)
                view = PrefixView(folder, tokens, prefix.plan().run.tokenized.token_ids)
                entry = _write(prefix.assemble(view), prefix, folder, out_dir, pair, tokens, longest, seconds)
        except Exception as error:  # recorded with its reason; the sweep goes on
            entry = _failure(pair, tokens, error)
        index.record(entry)
        logger.info("%s at %d tokens: %s%s", pair, tokens, entry.status, f" ({entry.reason})" if entry.reason else "")
    if not planned.run.config.save_residuals:
        for kind in STATE_KINDS:
            folder.drop(kind)


def run_pair(pair: str, lengths: Sequence[int], config: RunConfig, out_dir: Path, index: SweepIndex,
             preflight: Preflight | None, run_shards: RunShards = run_here) -> None:
    """One pair at every length the index does not hold as done."""
    missing = [tokens for tokens in lengths if not index.is_done(pair, tokens)]
    if not missing:
        return
    # Plan every length (the done ones too: a missing short length may ride on a done long one).
    comparisons = _plans(pair, sorted(set(lengths)), config, preflight, index)
    tokenized = {tokens: comparison.plan().run.tokenized for tokens, comparison in comparisons.items()}
    if not tokenized:
        return
    sources = capture_lengths(tokenized, config)
    for longest in sorted(set(sources.values()), reverse=True):
        served = [tokens for tokens, source in sources.items() if source == longest and tokens in missing]
        if not served:
            continue
        riders = tuple(sorted(tokens for tokens, source in sources.items() if source == longest and tokens != longest))
        try:
            _capture(pair, longest, served, comparisons, out_dir, preflight, index, run_shards, riders)
        except Exception as error:  # recorded with its reason; the sweep goes on
            for tokens in served:
                index.record(_failure(pair, tokens, error))


def run_sweep(pairs: Sequence[str], lengths: Sequence[int], config: RunConfig, out_dir: Path, *,
              preflight: Preflight | None = None, run_shards: RunShards = run_here,
              on_pair: Callable[[str], None] | None = None) -> SweepIndex:
    """Every pair at every length into ``out_dir`` (its ``sweep.json`` says what became of each);
    ``run_shards`` runs a capture's shards (here, or over Ray actors)."""
    index = SweepIndex.open(out_dir)
    for pair in pairs:
        run_pair(pair, lengths, config, out_dir, index, preflight, run_shards)
        if on_pair is not None:
            on_pair(pair)
    return index
