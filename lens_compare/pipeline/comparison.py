"""One comparison's lifecycle, the only orchestrator: plan, run shards into a store, assemble.

>>> comparison = Comparison(RunConfig(pair="smollm2-sanity", prompts=("Paris is",)))  # doctest: +SKIP
>>> comparison.plan().execution.strategy                                               # doctest: +SKIP
>>> store = MemoryStore(); comparison.run(store); result = comparison.assemble(store)   # doctest: +SKIP

- ``plan()``: everything that can be checked before a weight is read, once (prompts, layers,
  the hardware planner, the shard layout); it raises to refuse the run.
- ``run_shard(i, store)`` / ``run_shards(shards, store)``: those shards through both models into
  ``store``, skipping what the store already holds; callable on its own in any process that
  built the same ``Comparison`` (a notebook, the CLI, a sweep's worker). The models load once
  per call.
- ``run(store)``: every missing shard.
- ``assemble(store)``: the result, identical whether the shards ran in one call or many.

``compare()`` drives it with a ``MemoryStore``; ``python -m lens_compare.run`` with a
``RunFolder`` (which resumes) and then writes the outputs.
"""

import dataclasses
import functools
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lens_compare.config import RunConfig
from lens_compare.engines import Job, engine_for
from lens_compare.engines.noise_floor import run_noise_floor
from lens_compare.engines.shards import ShardLayout
from lens_compare.engines.steering import missing as missing_steering
from lens_compare.engines.store import Kind, MemoryStore, RunFolder, Store
from lens_compare.models.fingerprint import document_fingerprint
from lens_compare.pipeline.execution import Execution
from lens_compare.pipeline.prepare import LoadOverrides, PreparedRun
from lens_compare.pipeline.steps import (
    Preflight,
    assemble,
    build_demo_checkpoints,
    make_job,
    run_manifest,
    start_run,
    summary_line,
)
from lens_compare.results.result import ComparisonResult

logger = logging.getLogger("lens_compare")


def keeps_states(config: RunConfig, keep_residuals: bool = False) -> bool:
    """Whether a run keeps every captured state until the end, not just each shard's metrics: to
    return or write them, or for an analysis that reads them all at the end (CKA every layer's,
    the noise floor the SFT model's)."""
    return keep_residuals or config.save_residuals or config.cka or config.noise_floor


@dataclass(frozen=True)
class PlannedRun:
    """What ``Comparison.plan()`` settled before any weight is read."""

    run: PreparedRun
    layout: ShardLayout
    execution: Execution
    job: Job
    # What a run folder's name is a fingerprint of (``lens_compare.models.fingerprint``).
    manifest: dict[str, Any]


class Comparison:
    """A base/SFT comparison as ``config`` describes it; see the module docstring.

    ``held_in_memory``: every prompt's states stay in RAM until ``assemble`` (a ``MemoryStore``);
    False for a store that spills to disk (a ``RunFolder``), which the planner then counts as one
    shard's. ``preflight``: the planner's check (``memory_preflight``), or None to run
    sequentially on the configured device without one.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        preflight: Preflight | None = None,
        keep_residuals: bool = False,
        held_in_memory: bool = True,
        overrides: LoadOverrides | None = None,
    ):
        self.config = config
        self.keep_residuals = keep_residuals
        self._preflight = preflight
        self._held_in_memory = held_in_memory
        self._overrides = overrides
        self._recorded: PlannedRun | None = None

    @functools.cached_property
    def _planned(self) -> PlannedRun:
        run, layout, execution = start_run(self.config, overrides=self._overrides, preflight=self._preflight,
                                           held_in_memory=self._held_in_memory)
        keep = keeps_states(self.config, self.keep_residuals)
        job = make_job(run, layout, execution, keep_states=keep)
        return PlannedRun(run, layout, execution, job, run_manifest(run, layout, execution, keep))

    def plan(self) -> PlannedRun:
        """The run's plan, worked out on the first call (nothing loads)."""
        return self._recorded or self._planned

    def adopt_recorded(self, recorded: dict[str, Any] | None) -> dict[str, Any]:
        """Use the plan a store's run started with, if any, and return the record to keep: a
        resumed run reports the first plan and sizes its logit lens's chunks as the first did
        (the same numbers, whatever memory is free now)."""
        planned = self._planned
        if recorded is None:
            return {"estimate": planned.execution.estimate, "lens_chunk_bytes": planned.execution.lens_chunk_bytes}
        execution = dataclasses.replace(planned.execution, estimate=recorded["estimate"],
                                        lens_chunk_bytes=recorded["lens_chunk_bytes"])
        job = dataclasses.replace(planned.job, lens_chunk_bytes=execution.lens_chunk_bytes)
        self._recorded = dataclasses.replace(planned, execution=execution, job=job)
        return recorded

    def pending(self, store: Store) -> list[int]:
        """The shards ``store`` does not hold yet (metrics, and the noise floor where measured). With the
        difference lens, a store that holds every shard but not the lens's readings (an interruption
        after the last shard's sums) lists the last shard: running it computes the readings alone.
        With the steering check, a store that holds all that lists the shards that lack their steering
        sums (the last shard for the held-out prompts'): running any of them computes every one's (they
        need the whole run's δ)."""
        missing = self.missing_shards(store)
        if not missing and self.missing_readings(store):
            return [self.plan().layout.count - 1]
        # The held-out prompts' unit (numbered after the last shard) is computed by any shard's call.
        last = self.plan().layout.count - 1
        return missing or sorted({min(unit, last) for unit in missing_steering(self.plan().job, store)})

    def missing_shards(self, store: Store) -> list[int]:
        """The shards whose metrics (and noise floor, where measured) ``store`` lacks."""
        job = self.plan().job
        return [shard for shard in range(job.layout.count)
                if not store.has(Kind.METRICS, shard=shard)
                or (job.noise_floor and not store.has(Kind.NOISE, shard=shard))]

    def missing_readings(self, store: Store) -> bool:
        """Whether the run has a difference lens whose readings ``store`` lacks."""
        return self.plan().job.difference is not None and not store.has(Kind.DIFFERENCE_LENS)

    def run_shards(self, shards: Iterable[int], store: Store) -> float:
        """Run ``shards`` (those the store lacks) into ``store``; returns the wall time in seconds."""
        planned = self.plan()
        selected = tuple(sorted(set(shards)))
        beyond = [shard for shard in selected if not 0 <= shard < planned.layout.count]
        if beyond:
            raise IndexError(f"shard {beyond[0]} does not exist: this run has {planned.layout.count} "
                             f"(0..{planned.layout.count - 1})")
        start = time.perf_counter()
        if torch.cuda.is_available():
            for device in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(device)
        job = dataclasses.replace(planned.job, shards=selected)
        if any(shard in self.pending(store) for shard in selected):
            build_demo_checkpoints(planned.run)
        engine_for(planned.execution.schedule)(job, store)
        if job.noise_floor:
            run_noise_floor(job, planned.execution.schedule, store)
        return time.perf_counter() - start

    def run_shard(self, shard: int, store: Store) -> float:
        """Run one shard into ``store`` (nothing, if it holds it already)."""
        return self.run_shards((shard,), store)

    def run(self, store: Store) -> float:
        """Run every shard ``store`` lacks; returns the wall time in seconds."""
        return self.run_shards(range(self.plan().layout.count), store)

    def assemble(self, store: Store) -> ComparisonResult:
        """The result from ``store``, which must hold every shard."""
        planned = self.plan()
        missing = self.missing_shards(store)
        if missing:
            raise RuntimeError(f"cannot assemble: {len(missing)} of {planned.layout.count} shard(s) are not in "
                               f"the store yet (first: {missing[0]}); run them first")
        if self.missing_readings(store):
            raise RuntimeError("cannot assemble: the store holds every shard but not the difference lens's readings "
                               "(computed once every shard's sums are in); run(store) computes them")
        if missing_steering(planned.job, store):
            raise RuntimeError("cannot assemble: the store holds every shard but not all of the steering check's "
                               "sums (computed once the difference lens's mean shift is known); run(store) "
                               "computes them")
        return assemble(planned.run, planned.job, planned.execution, store, keep_residuals=self.keep_residuals)


def open_run_folder(comparison: Comparison, out_dir: Path) -> RunFolder:
    """The run folder of ``comparison`` under ``out_dir/runs`` (created, or found and checked),
    named by the run's fingerprint so that the same command resumes it; the comparison adopts
    the plan the folder's run started with."""
    planned = comparison.plan()
    name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', planned.run.pair)}-{document_fingerprint(planned.manifest)}"
    folder = RunFolder(Path(out_dir) / "runs" / name, planned.manifest)
    recorded = folder.get(Kind.PLAN) if folder.has(Kind.PLAN) else None
    folder.put(Kind.PLAN, comparison.adopt_recorded(recorded))
    return folder


def run_comparison(
    config: RunConfig,
    *,
    preflight: Preflight | None = None,
    keep_residuals: bool = False,
    overrides: LoadOverrides | None = None,
) -> ComparisonResult:
    """``config``'s comparison, every shard in memory (a ``MemoryStore``): ``compare()``'s path.

    ``preflight`` gets the run's plan facts before any weights are loaded and returns the
    ``Execution`` (``lens_compare.pipeline.preflight.memory_preflight`` asks the hardware planner), or
    raises to refuse the run. Without one, ``strategy: auto`` runs sequentially on the
    configured device.
    """
    comparison = Comparison(config, preflight=preflight, keep_residuals=keep_residuals, overrides=overrides)
    store = MemoryStore()
    seconds = comparison.run(store)
    result = comparison.assemble(store)
    planned = comparison.plan()
    logger.info(summary_line(planned.run, planned.execution, planned.job, seconds))
    return result
