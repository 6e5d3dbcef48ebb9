"""The ``ray`` executor: a capture's shards fanned out over Ray actors, on one machine or many.

The driver plans each capture and opens its run folder under ``--out``, which every node must
see (shared storage: checked at start, every worker writes a probe the driver must find). Each
actor rebuilds the same ``Comparison`` from the run's config, checks that it lands on the same
run folder, and runs its chunk of the shards with ``run_shards``: the models load once per chunk.
It asks Ray for what the planner says its strategy needs: the GPUs its models are placed on (a
placement group of that many GPUs on one node, ``STRICT_PACK``, for a split), and the host
memory the plan counts. A killed worker or a lost node costs only what it was running: Ray
restarts the actor (``max_restarts``) and retries the call (``max_task_retries``), and the retried
chunk skips every shard the run folder already holds (atomic files). The driver assembles the
run once every shard is in, exactly as the local executor does.

>>> index = run_sweep(pairs, lengths, config, out, run_shards=RayShards(workers=4))  # doctest: +SKIP
"""

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from lens_compare.config import RunConfig
from lens_compare.engines.store import RunFolder
from lens_compare.errors import ConfigError, HardwareError
from lens_compare.pipeline.comparison import Comparison, open_run_folder
from lens_compare.pipeline.execution import Execution
from lens_compare.pipeline.preflight import memory_preflight
from lens_compare.sweeps.local import peak_gib
from lens_compare.util.host_memory import reset_peak_rss
from lens_compare.util.units import GIB

logger = logging.getLogger("lens_compare")

# A restarted actor retries the call it died in; a shard already written is skipped, so a retry
# costs at most the shards of that call that were not finished.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3


def require_ray():
    """Ray, or a one-line error naming the extra, before anything loads."""
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray, which is not installed: pip install 'lens_compare[ray]'") from None
    return ray


def gpus_needed(execution: Execution) -> int:
    """The GPUs a run's models are placed on (0 on the CPU): one per device of a split."""
    devices = set()
    for options in execution.loads.values():
        if options.device_map:
            devices.update(d for d in options.device_map.values() if isinstance(d, int))
        elif options.device.startswith("cuda"):
            devices.add(options.device)
    return len(devices)


def actor_options(execution: Execution) -> dict[str, Any]:
    """What one shard worker asks Ray for: GPUs (the placement group's bundles for a split), one
    CPU, and the host memory the plan counts (a scheduling hint to Ray, not a limit)."""
    options: dict[str, Any] = {"num_cpus": 1, "max_restarts": MAX_RESTARTS, "max_task_retries": MAX_TASK_RETRIES}
    host_gib = (execution.estimate or {}).get("host_gib")
    if host_gib:
        options["memory"] = int(host_gib * GIB)
    gpus = gpus_needed(execution)
    if gpus == 1:
        options["num_gpus"] = 1
    elif gpus > 1:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        group = placement_group([{"GPU": 1, "CPU": 1}] * gpus, strategy="STRICT_PACK")
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            group, placement_group_capture_child_tasks=True)
        options["num_cpus"] = 0
    return options


class ShardWorker:
    """One Ray actor's work: the run's ``Comparison``, rebuilt from its config, and its run folder."""

    def __init__(self, config: dict[str, Any], out_dir: str, folder: str, check_memory: bool):
        import torch

        torch.set_num_threads(1)  # one CPU asked of Ray: the actors do not fight over the cores
        self.comparison = Comparison(RunConfig.from_dict(config), held_in_memory=False,
                                     preflight=memory_preflight if check_memory else None)
        self.folder = open_run_folder(self.comparison, Path(out_dir))
        if str(self.folder.path.resolve()) != folder:
            raise HardwareError(f"this worker's run folder {self.folder.path} is not the driver's {folder}: "
                                "the nodes differ in what the run is (device, package version or weights)")

    def run(self, shards: list[int]) -> float:
        """Run ``shards`` (those the folder lacks) with the models loaded once; returns this actor's
        peak memory in GiB while it ran them (the GPU's where it used one, else host RSS)."""
        reset_peak_rss()
        self.comparison.run_shards(shards, self.folder)
        return peak_gib(self.comparison.plan().run.device)

    def pid(self) -> int:
        return os.getpid()


def _probe(path: str) -> str:
    Path(path).write_text(socket.gethostname())
    return socket.gethostname()


class RayShards:
    """Runs a capture's missing shards over ``workers`` Ray actors (``run_sweep(run_shards=...)``).

    ``address``: a running cluster's (``ray://...`` or ``auto``), else a local Ray instance is
    started. Every node must see ``out_dir``: ``check_shared_storage`` says so before any run.
    """

    def __init__(self, workers: int = 1, address: str | None = None, check_memory: bool = True):
        if workers < 1:
            raise ConfigError(f"--workers {workers}: expected at least 1")
        self.ray = require_ray()
        if not self.ray.is_initialized():
            # "local": a new instance on this machine, not whatever cluster happens to run here.
            self.ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False)
        self.workers = workers
        self.check_memory = check_memory

    def check_shared_storage(self, out_dir: Path) -> None:
        """Every node writes a probe into ``out_dir``; the driver must see them all."""
        out_dir = Path(out_dir).resolve()  # the workers' working directory is not the driver's
        out_dir.mkdir(parents=True, exist_ok=True)
        nodes = [node for node in self.ray.nodes() if node.get("Alive")]
        probe = self.ray.remote(num_cpus=0)(_probe)
        paths = []
        for node in nodes:
            path = out_dir / f".probe-{uuid.uuid4().hex}"
            strategy = self.ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            paths.append((path, probe.options(scheduling_strategy=strategy).remote(str(path))))
        missing = []
        for path, ref in paths:
            host = self.ray.get(ref)
            if not path.exists():
                missing.append(host)
            path.unlink(missing_ok=True)
        if missing:
            raise ConfigError(f"--out {str(out_dir)!r} is not shared storage: the probe written on "
                              f"{', '.join(missing)} is not visible here; give every node the same --out "
                              "(a network file system or a mounted bucket)")

    def __call__(self, comparison: Comparison, folder: RunFolder) -> float | None:
        """Run the capture's missing shards over the actors; returns the busiest actor's peak memory
        in GiB (None when no shard was missing)."""
        pending = comparison.pending(folder)
        if not pending:
            return None
        execution = comparison.plan().execution
        count = min(self.workers, len(pending))
        worker = self.ray.remote(ShardWorker).options(**actor_options(execution))
        path = folder.path.resolve()  # absolute: the workers' working directory is not the driver's
        out_dir = path.parent.parent  # OUT/runs/<name>
        actors = [worker.remote(comparison.config.to_dict(), str(out_dir), str(path), self.check_memory)
                  for _ in range(count)]
        chunks = [pending[i::count] for i in range(count)]
        calls = {actor.run.remote(chunk): actor for actor, chunk in zip(actors, chunks, strict=True)}
        peaks = []
        try:
            while calls:
                # An actor holds its resources while it lives: each goes as soon as its call returns,
                # so that a restarted one (its node lost) can be placed where another finished.
                finished, _ = self.ray.wait(list(calls), num_returns=1)
                for call in finished:
                    peaks.append(self.ray.get(call))
                    self.ray.kill(calls.pop(call))
        finally:
            for actor in calls.values():
                self.ray.kill(actor)
        missing = comparison.pending(folder)
        if missing:
            raise HardwareError(f"{len(missing)} shard(s) are not in the run folder after the workers returned "
                                f"(first: {missing[0]})")
        return max(peaks)
