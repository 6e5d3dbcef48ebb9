"""The local executor: every pair of a sweep, one after another on this machine, each length
read off the longest capture it is a prefix of, each with the strategy the planner picks here.

Every capture keeps its run folder (shards, resume); every run gets its JSON
(``OUT/<pair>-<N>tok.json``) and an entry in ``OUT/sweep.json``. A pair that fails is recorded
with its one-line reason and the sweep goes on; the same call again redoes only what is missing.
"""

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
from lens_compare.sweeps.progress import SweepProgress
from lens_compare.util.host_memory import peak_rss_bytes, reset_peak_rss
from lens_compare.util.units import GIB

logger = logging.getLogger("lens_compare")


def run_stem(out_dir: Path, pair: str, tokens: int) -> Path:
    return Path(out_dir) / f"{pair}-{tokens}tok"


def peak_gib(device: str) -> float:
    """This process's peak memory since ``reset_peak_rss`` (host) or since ``Comparison.run_shards``
    started (it resets the GPUs' peaks): the busiest GPU's where the run used one, else host RSS."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count())) / GIB
    return peak_rss_bytes() / GIB


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
           tokens: int, captured_at: int, seconds: float, peak: float | None) -> SweepEntry:
    planned = comparison.plan()
    stem = run_stem(out_dir, pair, tokens)
    write_outputs(result, comparison.config, stem, planned.job, folder)
    return SweepEntry(pair, tokens, "done", json=stem.with_suffix(".json").name, captured_at=captured_at,
                      strategy=planned.execution.strategy, seconds=round(seconds, 2),
                      peak_gib=None if peak is None else round(peak, 3))


@dataclass
class Capture:
    """One capture of a sweep: a pair at its ``longest`` length, run once, and the lengths it serves
    (itself, and the shorter ones read off it). ``folder``: its run folder, once opened."""

    pair: str
    longest: int
    served: list[int]
    comparisons: dict[int, Comparison]
    folder: RunFolder | None = None

    @property
    def comparison(self) -> Comparison:
        return self.comparisons[self.longest]

    def pending(self) -> list[int]:
        """The shards its run folder lacks."""
        return self.comparison.pending(self.folder)


class Sweep:
    """What an executor needs of the sweep: open a capture's run folder, then record it as finished
    (its runs written) or failed, and the progress to show while its shards run."""

    def __init__(self, out_dir: Path, index: SweepIndex, preflight: Preflight | None, progress: SweepProgress):
        self.out_dir = Path(out_dir)
        self.index = index
        self.preflight = preflight
        self.progress = progress

    def open(self, capture: Capture) -> RunFolder:
        planned: PlannedRun = capture.comparison.plan()
        check_spill_space(planned.run, planned.job, planned.execution, self.out_dir)
        capture.folder = open_run_folder(capture.comparison, self.out_dir)
        return capture.folder

    def watch(self, capture: Capture) -> None:
        """Count the capture's shards on the bar while they run."""
        self.progress.watch(id(capture), capture.pair, capture.longest, runs=len(capture.served),
                            pending=capture.pending, shards=capture.comparison.plan().layout.count)

    def finish(self, capture: Capture, seconds: float, peak: float | None) -> None:
        """Every shard is in: write each length the capture serves, longest first."""
        self.progress.unwatch(id(capture))
        capture_plan = capture.comparison.plan()
        for tokens in sorted(capture.served, reverse=True):
            try:
                if tokens == capture.longest:
                    comparison, store = capture.comparison, capture.folder
                else:
                    # The shorter run with the capture's shards, read through a view cut to its length; the
                    # steering check ran on the capture's whole prompts, not this length's (prefix.py).
                    config = capture.comparisons[tokens].config.replace(shard_size=capture_plan.layout.size,
                                                                        steer=False, steer_prompts=None)
                    comparison = Comparison(config, preflight=self.preflight, held_in_memory=False)
                    store = PrefixView(capture.folder, tokens, comparison.plan().run.tokenized.token_ids)
                entry = _write(comparison.assemble(store), comparison, capture.folder, self.out_dir, capture.pair,
                               tokens, capture.longest, seconds, peak)
            except Exception as error:  # recorded with its reason; the sweep goes on
                entry = _failure(capture.pair, tokens, error)
            self.index.record(entry)
        if not capture_plan.run.config.save_residuals:
            for kind in STATE_KINDS:
                capture.folder.drop(kind)

    def fail(self, capture: Capture, error: BaseException) -> None:
        """The capture could not run: each length it serves is recorded with the reason."""
        self.progress.unwatch(id(capture))
        for tokens in capture.served:
            self.index.record(_failure(capture.pair, tokens, error))


# Runs a sweep's captures: each one's missing shards into its run folder, then ``sweep.finish``
# (or ``sweep.fail``) for it: ``run_here``, or ``lens_compare.sweeps.ray_executor.RayExecutor``.
Executor = Callable[[Sequence[Capture], Sweep], None]


def run_here(captures: Sequence[Capture], sweep: Sweep) -> None:
    """The local executor: one capture after another in this process, with the models loaded once
    per capture."""
    for capture in captures:
        try:
            sweep.open(capture)
            peak = None
            start = time.perf_counter()
            if capture.pending():
                sweep.watch(capture)
                reset_peak_rss()
                capture.comparison.run(capture.folder)
                peak = peak_gib(capture.comparison.plan().run.device)
            sweep.finish(capture, time.perf_counter() - start, peak)
        except Exception as error:  # recorded with its reason; the sweep goes on
            sweep.fail(capture, error)


def plan_captures(pair: str, lengths: Sequence[int], config: RunConfig, index: SweepIndex,
                  preflight: Preflight | None) -> list[Capture]:
    """The captures that make ``pair``'s missing lengths, longest first; nothing loads. A length
    refused here is recorded."""
    missing = [tokens for tokens in lengths if not index.is_done(pair, tokens)]
    if not missing:
        return []
    # Plan every length (the done ones too: a missing short length may ride on a done long one).
    comparisons = _plans(pair, sorted(set(lengths)), config, preflight, index)
    if not comparisons:
        return []
    tokenized = {tokens: comparison.plan().run.tokenized for tokens, comparison in comparisons.items()}
    sources = capture_lengths(tokenized, config)
    captures = []
    for longest in sorted(set(sources.values()), reverse=True):
        served = [tokens for tokens, source in sources.items() if source == longest and tokens in missing]
        if not served:
            continue
        riders = tuple(sorted(tokens for tokens, source in sources.items() if source == longest and tokens != longest))
        ours = comparisons
        if riders and comparisons[longest].plan().job.difference is not None:
            # The difference lens's sums cover whole prompts: the capture also sums each rider's first positions.
            capture = comparisons[longest]
            ours = {**comparisons, longest: Comparison(capture.config.replace(prefix_lengths=riders),
                                                       preflight=preflight, held_in_memory=False)}
        captures.append(Capture(pair, longest, served, ours))
    return captures


def run_sweep(pairs: Sequence[str], lengths: Sequence[int], config: RunConfig, out_dir: Path, *,
              preflight: Preflight | None = None, executor: Executor = run_here,
              progress: bool = True) -> SweepIndex:
    """Every pair at every length into ``out_dir`` (its ``sweep.json`` says what became of each).
    Every capture is planned first (nothing loads; a refusal is recorded at once), then
    ``executor`` runs them: ``run_here`` one after another, or ``RayExecutor`` over Ray actors.
    ``progress``: one bar over the runs, moved on by the shards, and a line per finished run."""
    index = SweepIndex.open(out_dir)
    lengths = sorted(set(lengths))
    done = sum(index.is_done(pair, tokens) for pair in pairs for tokens in lengths)
    with SweepProgress(len(pairs) * len(lengths), done, show=progress) as bar:
        index.on_record = bar.finished
        try:
            captures = [capture for pair in pairs for capture in plan_captures(pair, lengths, config, index, preflight)]
            executor(captures, Sweep(out_dir, index, preflight, bar))
        finally:
            index.on_record = None
    return index
