"""Peak memory, fit, minimum GPU count, time and cost of each strategy.

Strategies, in the order the planner prefers them:
- ``resident``: both models loaded at once, on one GPU or split by layers over the
  machine's GPUs (accelerate ``device_map``/``max_memory``);
- ``sequential``: one model at a time on the GPU(s); the first model's residuals
  wait in host RAM while it is swapped out for the second;
- ``nf4``: bitsandbytes 4-bit weights, resident if that fits, else sequential;
- ``cpu``: weights in host RAM, streamed to the GPU one block at a time (accelerate
  CPU offload); the GPU only holds one block and the forward's working set.
Split over N GPUs, each GPU holds the whole modules the greedy layout gives it
(``layout.py``: what the executed device map will be), its share of the captured
residuals, the full forward transient (worst case: the last GPU computes the logits)
and its own context.
"""

from dataclasses import dataclass
from typing import Any

from lens_compare.hardware.estimate import ModelEstimate
from lens_compare.hardware.layout import Layout, place
from lens_compare.hardware.machine import MAX_GPUS_PER_MACHINE, Machine
from lens_compare.hardware.run_memory import CUDA_CONTEXT_GIB, MARGIN, RUN_SETUP_HOST_GIB, Workload
from lens_compare.hardware.timing import run_cost, run_seconds
from lens_compare.hardware.units import GIB

STRATEGIES: tuple[str, ...] = ("resident", "sequential", "nf4", "cpu")


@dataclass(frozen=True)
class Peak:
    device_gib: float
    host_gib: float
    layout: str
    # A split over several GPUs: the layouts the device maps will follow (one for both
    # models when resident, one per model when sequential), None when not split.
    splits: tuple[Layout, ...] | None = None


@dataclass(frozen=True)
class StrategyResult:
    name: str
    precision: str
    layout: str
    fits: bool
    min_gpus: int | None
    peak_gib_per_gpu: float
    host_gib: float
    headroom_gib: float
    est_seconds: float | None
    est_cost_usd: float | None
    reason: str | None = None
    # How the weights split over the GPUs (see Peak.splits); None on one device.
    splits: tuple[Layout, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "min_gpus": self.min_gpus,
            "precision": self.precision,
            "layout": self.layout,
            "peak_gib_per_gpu": round(self.peak_gib_per_gpu, 3),
            "host_gib": round(self.host_gib, 3),
            "headroom_gib": round(self.headroom_gib, 3),
            "est_seconds": None if self.est_seconds is None else round(self.est_seconds, 2),
            "est_cost_usd": None if self.est_cost_usd is None else round(self.est_cost_usd, 5),
            "reason": self.reason,
            "split_weights_gib": None if self.splits is None else [
                [round(b / GIB, 3) for b in layout.per_gpu] for layout in self.splits
            ],
        }


def _p(model: ModelEstimate, precision: str | None) -> str:
    """The weight precision of ``model``: its own unless the strategy imposes one (nf4)."""
    return precision or model.precision


def _load(model: ModelEstimate, precision: str | None) -> float:
    """Host memory the load of ``model`` adds on top of its weights, in that precision."""
    if _p(model, precision) == "nf4":
        return model.terms.nf4_load_transient
    return model.terms.load_transient


def _with_overheads(gib_: float, machine: Machine) -> float:
    context = CUDA_CONTEXT_GIB if machine.kind == "cuda" else 0.0
    return gib_ * (1 + MARGIN) + context


def weight_budget_gib(machine: Machine, other_gib: float) -> float:
    """GiB of weights one GPU may take when ``other_gib`` of run memory shares it (the inverse
    of ``_with_overheads``)."""
    context = CUDA_CONTEXT_GIB if machine.kind == "cuda" else 0.0
    return (machine.device_gib - context) / (1 + MARGIN) - other_gib


def _split_weights(models, p: str | None, machine: Machine, other_gib: float, balanced: bool
                   ) -> tuple[float, Layout | None]:
    """Per-GPU weight GiB of the greedy layout of ``models`` (the most loaded GPU), and the layout.

    When the models do not fit, the GiB an even share plus one module would need (for
    the explanation) and None.
    """
    chunks = [m.chunks[_p(m, p)] for m in models]
    budget = int(weight_budget_gib(machine, other_gib) * GIB)
    layout = place(chunks, machine.count, max(budget, 0), balanced=balanced)
    if layout is None:
        total = sum(sum(c) for c in chunks)
        return (total / machine.count + max(max(c) for c in chunks)) / GIB, None
    return layout.peak / GIB, layout


def resident_peak(models: tuple[ModelEstimate, ...], p: str | None, machine: Machine,
                  balanced: bool = True) -> Peak:
    n = machine.count
    residuals = sum(m.terms.residuals for m in models) / n
    upcast = sum(m.terms.metrics_upcast for m in models) / n
    transient = max(m.terms.forward_transient for m in models)
    splits = None
    if n == 1:
        weights = sum(m.weights[_p(m, p)].gib for m in models)
    else:
        weights, layout = _split_weights(models, p, machine, residuals + max(transient, upcast), balanced)
        splits = (layout,) if layout else None
    on_cpu = machine.kind == "cpu"
    load = max(_load(m, p) for m in models) if on_cpu else 0.0
    # On the CPU the run's own host memory shares the one memory with the weights.
    host = RUN_SETUP_HOST_GIB + sum(m.terms.bridge_host for m in models) if on_cpu else 0.0
    phases = (
        weights + load + host,
        weights + residuals + transient + host,
        weights + residuals + upcast + host,
    )
    return Peak(_with_overheads(max(phases), machine), 0.0, "resident", splits)


def sequential_peak(models: tuple[ModelEstimate, ...], p: str | None, machine: Machine,
                    balanced: bool = True) -> Peak:
    n = machine.count
    residuals_all = sum(m.terms.residuals for m in models)
    metrics = residuals_all + sum(m.terms.metrics_upcast for m in models)
    per_model, layouts = [], []
    for m in models:
        if machine.kind == "cpu":
            weights = m.weights[_p(m, p)].gib + RUN_SETUP_HOST_GIB + m.terms.bridge_host
            # Host and device are one memory: earlier residuals stay beside the model.
            per_model += [weights + _load(m, p) + residuals_all,
                          weights + residuals_all + m.terms.forward_transient, weights + metrics]
            continue
        other = m.terms.residuals / n + m.terms.forward_transient
        if n == 1:
            weights = m.weights[_p(m, p)].gib
        else:
            weights, layout = _split_weights((m,), p, machine, other, balanced)
            layouts.append(layout)
        per_model.append(weights + other)
    host = 0.0 if machine.kind == "cpu" else metrics + max(_load(m, p) for m in models)
    splits = tuple(layouts) if layouts and all(layouts) else None
    return Peak(_with_overheads(max(per_model), machine), host, "sequential", splits)


def offload_peak(models: tuple[ModelEstimate, ...], p: str | None, machine: Machine) -> Peak:
    device = max(m.largest_block[_p(m, p)].gib + m.terms.forward_transient for m in models)
    host = max(m.weights[_p(m, p)].gib + _load(m, p) for m in models)
    host += sum(m.terms.residuals + m.terms.metrics_upcast for m in models)
    return Peak(_with_overheads(device, machine), host, "cpu offload")


def _fits(peak: Peak, machine: Machine) -> bool:
    return peak.device_gib <= machine.device_gib and peak.host_gib <= machine.host_ram_gib


def _peak(name: str, models, p: str | None, machine: Machine, balanced: bool = True) -> Peak:
    if name == "resident":
        return resident_peak(models, p, machine, balanced)
    if name == "sequential":
        return sequential_peak(models, p, machine, balanced)
    if name == "nf4":
        peak = resident_peak(models, p, machine, balanced)
        return peak if _fits(peak, machine) else sequential_peak(models, p, machine, balanced)
    return offload_peak(models, p, machine)


def min_gpus(name: str, models, p: str | None, machine: Machine, limit: int = MAX_GPUS_PER_MACHINE) -> int | None:
    """Fewest GPUs of this type that fit, up to ``limit``; None if none suffice."""
    if machine.kind == "cpu":
        return 1 if _fits(_peak(name, models, p, machine), machine) else None
    for n in range(1, limit + 1):
        if _fits(_peak(name, models, p, machine.with_count(n), balanced=False), machine.with_count(n)):
            return n
    return None


def _unavailable(name: str, precision: str, reason: str) -> StrategyResult:
    return StrategyResult(name, precision, "n/a", False, None, 0.0, 0.0, 0.0, None, None, reason)


def evaluate(name: str, models: tuple[ModelEstimate, ...], precision: str | None, machine: Machine,
             workload: Workload) -> StrategyResult:
    """One strategy on ``machine``; ``precision`` None keeps each model's own precision."""
    label = precision or "/".join(dict.fromkeys(m.precision for m in models))
    # bitsandbytes (>= 0.45) runs NF4 on the CPU too, so only offload has no CPU meaning.
    if machine.kind == "cpu" and name == "cpu":
        return _unavailable(name, label, "no GPU: 'resident' and 'sequential' already run on the CPU")
    peak = _peak(name, models, precision, machine)
    fits = _fits(peak, machine)
    seconds = run_seconds(models, precision, machine, workload, stream_weights=name == "cpu")
    reason = None
    if not fits:
        if peak.device_gib > machine.device_gib:
            reason = f"needs {peak.device_gib:.2f} GiB per device, has {machine.device_gib:.2f}"
        else:
            reason = f"needs {peak.host_gib:.1f} GiB host RAM, has {machine.host_ram_gib:.1f}"
    return StrategyResult(
        name=name,
        precision=label,
        layout=peak.layout,
        fits=fits,
        min_gpus=min_gpus(name, models, precision, machine),
        peak_gib_per_gpu=peak.device_gib,
        host_gib=peak.host_gib,
        headroom_gib=machine.device_gib - peak.device_gib,
        est_seconds=seconds,
        est_cost_usd=run_cost(seconds, machine),
        reason=reason,
        splits=peak.splits if fits else None,
    )


def min_gpus_anywhere(models, precision: str | None, machine: Machine, limit: int = 4096) -> int | None:
    """Resident GPUs needed ignoring the one-machine limit (for 'beyond one machine')."""
    if machine.kind == "cpu":
        return None
    lo_guess = sum(m.weights[_p(m, precision)].gib for m in models) / machine.device_gib
    for n in range(max(1, int(lo_guess)), limit + 1):
        trial = machine.with_count(n)
        if _fits(resident_peak(models, precision, trial, balanced=False), trial):
            return n
    return None
