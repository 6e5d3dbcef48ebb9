"""The ``ray`` executor: a sweep's captures and their shards fanned out over Ray actors, on one
machine or many.

The driver plans every capture and opens its run folder under ``--out``, which every node must
see (shared storage: checked at start, every worker writes a probe the driver must find). It
keeps at most ``--workers`` actors at work, each on a chunk of one capture's shards: several
captures side by side when there are several, one capture split over every worker when there is
one. Each actor rebuilds the same ``Comparison`` from the run's config, checks that it lands on
the same run folder, and runs its chunk with ``run_shards``: the models load once per chunk.
It asks Ray for what the planner says its strategy needs: the GPUs its models are placed on (a
placement group of that many GPUs on one node, ``STRICT_PACK``, for a split), and the host
memory the plan counts. A killed worker or a lost node costs only what it was running: Ray
restarts the actor (``max_restarts``) and retries the call (``max_task_retries``), and the retried
chunk skips every shard the run folder already holds (atomic files); a chunk whose retries are
spent fails its capture, recorded with its reason, and the sweep goes on. The driver assembles a
capture's runs once every shard is in, exactly as the local executor does.

>>> index = run_sweep(pairs, lengths, config, out, executor=RayExecutor(workers=4))  # doctest: +SKIP
"""

import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_compare.config import RunConfig
from lens_compare.engines.store import RunFolder
from lens_compare.errors import ConfigError, HardwareError
from lens_compare.hardware.machine import Machine, catalog_machine
from lens_compare.pipeline.comparison import Comparison, open_run_folder
from lens_compare.pipeline.execution import Execution
from lens_compare.pipeline.preflight import memory_preflight
from lens_compare.sweeps.local import Capture, Sweep, peak_gib
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
    """One Ray actor: it runs chunks of shards, of one capture or of several in turn (the libraries
    imported once), each with the capture's ``Comparison`` rebuilt from its config."""

    def __init__(self, check_memory: bool):
        import torch

        torch.set_num_threads(1)  # one CPU asked of Ray: the actors do not fight over the cores
        self.check_memory = check_memory
        self.runs: dict[str, tuple[Comparison, RunFolder]] = {}

    def _open(self, config: dict[str, Any], out_dir: str, folder: str) -> tuple[Comparison, RunFolder]:
        if folder not in self.runs:
            comparison = Comparison(RunConfig.from_dict(config), held_in_memory=False,
                                    preflight=memory_preflight if self.check_memory else None)
            opened = open_run_folder(comparison, Path(out_dir))
            if str(opened.path.resolve()) != folder:
                raise HardwareError(f"this worker's run folder {opened.path} is not the driver's {folder}: "
                                    "the nodes differ in what the run is (device, package version or weights)")
            self.runs = {folder: (comparison, opened)}  # the capture before is done with
        return self.runs[folder]

    def run(self, config: dict[str, Any], out_dir: str, folder: str, shards: list[int]) -> float:
        """Run ``shards`` of the capture whose run folder is ``folder`` (those it lacks), the models
        loaded once; returns this actor's peak memory in GiB while it ran them (the GPU's where it
        used one, else host RSS)."""
        comparison, opened = self._open(config, out_dir, folder)
        reset_peak_rss()
        comparison.run_shards(shards, opened)
        return peak_gib(comparison.plan().run.device)

    def pid(self) -> int:
        return os.getpid()


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Refuse, in one line and within ``timeout`` seconds, a ``--ray-address`` where nothing answers
    (Ray itself retries for minutes). ``auto`` and ``local`` are Ray's own lookups, left to it."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected HOST:PORT (the head's, e.g. 10.0.0.1:6379), "
                          "ray://HOST:10001 for Ray Client, or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ConfigError(f"--ray-address {address!r}: nothing answers at {host}:{port} ({error.strerror or error}); "
                          "start the head there with `ray start --head --port PORT`, or leave --ray-address out "
                          "for a local instance") from None


def cluster_machine(nodes: list[dict[str, Any]]) -> tuple[Machine, int]:
    """The machine a dry run plans for on a Ray cluster: its largest node (by GPU memory, else host
    memory), from what each node tells Ray (``GPU``, ``accelerator_type:NAME``, ``memory``), and how
    many nodes are like it."""
    machines = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        resources = node.get("Resources", {})
        host_gib = resources.get("memory", 0) / GIB
        gpus = int(resources.get("GPU", 0))
        if gpus:
            kinds = [key.partition(":")[2] for key in resources if key.startswith("accelerator_type:")]
            if not kinds:
                raise ConfigError(f"Ray node {node.get('NodeManagerAddress')} has {gpus} GPU(s) but does not say "
                                  "which (no accelerator_type resource): give --gpu NAME --count N")
            machines.append(catalog_machine(kinds[0], gpus, host_gib or None))
        else:
            machines.append(Machine("cpu", 1, host_gib, host_gib, None, "cpu"))
    if not machines:
        raise ConfigError("the Ray cluster has no live node to plan for")
    largest = max(machines, key=lambda m: (m.kind == "cuda", m.count * m.device_gib, m.host_ram_gib))
    return largest, sum(m == largest for m in machines)


def _fits(held: dict[str, Any], needed: dict[str, Any]) -> bool:
    """Whether an actor created with ``held`` can run a chunk that asks for ``needed``."""
    if "scheduling_strategy" in held or "scheduling_strategy" in needed:
        return False
    same = {key: value for key, value in held.items() if key != "memory"}
    return same == {key: value for key, value in needed.items() if key != "memory"} \
        and held.get("memory", 0) >= needed.get("memory", 0)


def _probe(path: str) -> str:
    Path(path).write_text(socket.gethostname())
    return socket.gethostname()


@dataclass
class _Running:
    """A capture under way: its chunks still out, its actors' peaks, when it started, its error."""

    capture: Capture
    chunks: int
    peaks: list[float] = field(default_factory=list)
    start: float | None = None
    error: BaseException | None = None


class RayExecutor:
    """Runs a sweep's captures over at most ``workers`` Ray actors at a time
    (``run_sweep(executor=...)``).

    Each capture's missing shards are cut into chunks, one per actor: ``workers`` // the number of
    captures (at least one), so a sweep of many pairs runs whole pairs side by side (each loaded
    once) and a sweep of one pair splits it over every worker. The driver starts an actor per chunk
    as a slot frees, and assembles and writes a capture's runs once all its chunks are in.
    ``address``: a running cluster's (``ray://...`` or ``auto``), else a local Ray instance is
    started. Every node must see ``out_dir``: ``check_shared_storage`` says so before any run.
    """

    def __init__(self, workers: int = 1, address: str | None = None, check_memory: bool = True):
        if workers < 1:
            raise ConfigError(f"--workers {workers}: expected a whole number of at least 1")
        self.ray = require_ray()
        if address and not self.ray.is_initialized():
            check_reachable(address)
        if not self.ray.is_initialized():
            # "local": a new instance on this machine, not whatever cluster happens to run here.
            # No dashboard on a local instance: seconds of start-up and a core's share a sweep does not use.
            local = {} if address else {"include_dashboard": False}
            try:
                self.ray.init(address=address or "local", logging_level=logging.WARNING, log_to_driver=False, **local)
            except (ConnectionError, TimeoutError, RuntimeError) as error:
                where = f"the Ray cluster at --ray-address {address!r}" if address else "a local Ray instance"
                raise ConfigError(f"could not connect to {where}: {' '.join(str(error).split())}") from None
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

    def _chunks(self, captures: Sequence[Capture], sweep: Sweep) -> tuple[deque, dict[int, _Running]]:
        """Open every capture's run folder and cut its missing shards into chunks; a capture with
        none missing is finished at once."""
        per_capture = max(1, self.workers // max(1, len(captures)))
        chunks: deque = deque()
        running: dict[int, _Running] = {}
        for capture in captures:
            try:
                sweep.open(capture)
                pending = capture.pending()
            except Exception as error:  # recorded with its reason; the sweep goes on
                sweep.fail(capture, error)
                continue
            if not pending:
                sweep.finish(capture, 0.0, None)
                continue
            count = min(per_capture, len(pending))
            running[id(capture)] = _Running(capture, chunks=count)
            chunks.extend((capture, pending[i::count]) for i in range(count))
        return chunks, running

    def _actor(self, options: dict[str, Any], idle: list[tuple[Any, dict[str, Any]]]):
        """An idle actor that fits ``options`` (the same GPUs, at least the memory; never one
        placed in a placement group), else a new one (an idle one that does not fit goes first)."""
        for i, (actor, held) in enumerate(idle):
            if _fits(held, options):
                del idle[i]
                return actor, held
        if idle:
            self.ray.kill(idle.pop(0)[0])
        return self._new_actor(options), options

    def _new_actor(self, options: dict[str, Any]):
        return self.ray.remote(ShardWorker).options(**options).remote(self.check_memory)

    def _dispatch(self, capture: Capture, chunk: list[int], idle: list[tuple[Any, dict[str, Any]]]):
        """Start ``chunk`` of ``capture`` on an actor; returns the call, the actor and its options."""
        actor, held = self._actor(actor_options(capture.comparison.plan().execution), idle)
        path = capture.folder.path.resolve()  # absolute: the workers' working directory is not the driver's
        return actor.run.remote(capture.comparison.config.to_dict(), str(path.parent.parent), str(path), chunk), \
            actor, held

    def __call__(self, captures: Sequence[Capture], sweep: Sweep) -> None:
        chunks, running = self._chunks(captures, sweep)
        calls: dict[Any, tuple[Any, dict[str, Any], _Running]] = {}
        idle: list[tuple[Any, dict[str, Any]]] = []
        try:
            while chunks or calls:
                while chunks and len(calls) < self.workers:
                    capture, chunk = chunks.popleft()
                    state = running[id(capture)]
                    if state.error is not None:  # another chunk of it failed: this one is not started
                        state.chunks -= 1
                        if state.chunks == 0:
                            self._end(state, sweep)
                        continue
                    if state.start is None:
                        state.start = time.perf_counter()
                        sweep.watch(capture)
                    call, actor, held = self._dispatch(capture, chunk, idle)
                    calls[call] = (actor, held, state)
                # An actor holds its resources while it lives: one whose call returned takes the next
                # chunk that fits it, or goes, so that another (or one restarted after its node was
                # lost) finds room.
                if not calls:
                    continue
                finished, _ = self.ray.wait(list(calls), num_returns=1)
                for call in finished:
                    actor, held, state = calls.pop(call)
                    try:
                        state.peaks.append(self.ray.get(call))
                    except Exception as error:  # Ray's retries are spent: the capture failed
                        state.error = state.error or error
                    if chunks and state.error is None:
                        idle.append((actor, held))
                    else:
                        self.ray.kill(actor)
                    state.chunks -= 1
                    if state.chunks == 0:
                        self._end(state, sweep)
                while idle and not chunks:
                    self.ray.kill(idle.pop()[0])
        finally:
            for actor, *_ in [*calls.values(), *idle]:
                self.ray.kill(actor)

    @staticmethod
    def _end(state: _Running, sweep: Sweep) -> None:
        """Every chunk of the capture is back (or was not started after one failed)."""
        capture = state.capture
        missing = capture.pending() if state.error is None else []
        if missing:
            state.error = HardwareError(f"{len(missing)} shard(s) are not in the run folder after the workers "
                                        f"returned (first: {missing[0]})")
        if state.error is not None:
            sweep.fail(capture, state.error)
        else:
            sweep.finish(capture, time.perf_counter() - state.start, max(state.peaks))
