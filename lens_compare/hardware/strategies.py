"""Peak memory, fit, minimum GPU count, time and cost of each strategy.

Strategies, in the order the planner prefers them:
- ``resident``: both models loaded at once, on one GPU or split by layers over the
  machine's GPUs (accelerate ``device_map``/``max_memory``);
- ``sequential``: one model at a time on the GPU(s); the first model's residuals
  wait in host RAM while it is swapped out for the second;
- ``nf4``: bitsandbytes 4-bit weights, resident if that fits, else sequential;
- ``cpu``: weights in host RAM, streamed to the GPU one block at a time (accelerate
  CPU offload); the GPU only holds one block and the forward's working set.
Split over N GPUs, each GPU holds 1/N of the weights plus up to one block of
imbalance (a block is never split), its share of the captured residuals, the full
forward transient (worst case: the last GPU computes the logits) and its own context.
"""

from dataclasses import dataclass
from typing import Any

from lens_compare.hardware.estimate import ModelEstimate
from lens_compare.hardware.machine import MAX_GPUS_PER_MACHINE, Machine
from lens_compare.hardware.run_memory import CUDA_CONTEXT_GIB, MARGIN
from lens_compare.hardware.timing import run_cost, run_seconds

STRATEGIES: tuple[str, ...] = ("resident", "sequential", "nf4", "cpu")


@dataclass(frozen=True)
class Peak:
    device_gib: float
    host_gib: float
    layout: str


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
        }


def _p(model: ModelEstimate, precision: str | None) -> str:
    """The weight precision of ``model``: its own unless the strategy imposes one (nf4)."""
    return precision or model.precision


def _share(weights_gib: float, block_gib: float, n: int) -> float:
    return weights_gib if n == 1 else weights_gib / n + block_gib


def _with_overheads(gib_: float, machine: Machine) -> float:
    context = CUDA_CONTEXT_GIB if machine.kind == "cuda" else 0.0
    return gib_ * (1 + MARGIN) + context


def resident_peak(models: tuple[ModelEstimate, ...], p: str | None, machine: Machine) -> Peak:
    n = machine.count
    weights = _share(sum(m.weights[_p(m, p)].gib for m in models), max(m.largest_block[_p(m, p)].gib for m in models), n)
    residuals = sum(m.terms.residuals for m in models) / n
    upcast = sum(m.terms.metrics_upcast for m in models) / n
    on_cpu = machine.kind == "cpu"
    load = max(m.terms.load_transient for m in models) if on_cpu else 0.0
    phases = (
        weights + load,
        weights + residuals + max(m.terms.forward_transient for m in models),
        weights + residuals + upcast,
    )
    return Peak(_with_overheads(max(phases), machine), 0.0, "resident")


def sequential_peak(models: tuple[ModelEstimate, ...], p: str | None, machine: Machine) -> Peak:
    n = machine.count
    residuals_all = sum(m.terms.residuals for m in models)
    metrics = residuals_all + sum(m.terms.metrics_upcast for m in models)
    per_model = []
    for m in models:
        weights = _share(m.weights[_p(m, p)].gib, m.largest_block[_p(m, p)].gib, n)
        if machine.kind == "cpu":
            # Host and device are one memory: earlier residuals stay beside the model.
            per_model += [weights + m.terms.load_transient + residuals_all,
                          weights + residuals_all + m.terms.forward_transient, weights + metrics]
        else:
            per_model.append(weights + m.terms.residuals / n + m.terms.forward_transient)
    host = 0.0 if machine.kind == "cpu" else metrics + max(m.terms.load_transient for m in models)
    return Peak(_with_overheads(max(per_model), machine), host, "sequential")


def offload_peak(models: tuple[ModelEstimate, ...], p: str | None, machine: Machine) -> Peak:
    device = max(m.largest_block[_p(m, p)].gib + m.terms.forward_transient for m in models)
    host = max(m.weights[_p(m, p)].gib + m.terms.load_transient for m in models)
    host += sum(m.terms.residuals + m.terms.metrics_upcast for m in models)
    return Peak(_with_overheads(device, machine), host, "cpu offload")


def _fits(peak: Peak, machine: Machine) -> bool:
    return peak.device_gib <= machine.device_gib and peak.host_gib <= machine.host_ram_gib


def _peak(name: str, models, p: str | None, machine: Machine) -> Peak:
    if name == "resident":
        return resident_peak(models, p, machine)
    if name == "sequential":
        return sequential_peak(models, p, machine)
    if name == "nf4":
        peak = resident_peak(models, p, machine)
        return peak if _fits(peak, machine) else sequential_peak(models, p, machine)
    return offload_peak(models, p, machine)


def min_gpus(name: str, models, p: str | None, machine: Machine, limit: int = MAX_GPUS_PER_MACHINE) -> int | None:
    """Fewest GPUs of this type that fit, up to ``limit``; None if none suffice."""
    if machine.kind == "cpu":
        return 1 if _fits(_peak(name, models, p, machine), machine) else None
    for n in range(1, limit + 1):
        if _fits(_peak(name, models, p, machine.with_count(n)), machine.with_count(n)):
            return n
    return None


def _unavailable(name: str, precision: str, reason: str) -> StrategyResult:
    return StrategyResult(name, precision, "n/a", False, None, 0.0, 0.0, 0.0, None, None, reason)


def evaluate(name: str, models: tuple[ModelEstimate, ...], precision: str | None, machine: Machine,
             tokens: int) -> StrategyResult:
    """One strategy on ``machine``; ``precision`` None keeps each model's own precision."""
    label = precision or "/".join(dict.fromkeys(m.precision for m in models))
    # bitsandbytes (>= 0.45) runs NF4 on the CPU too, so only offload has no CPU meaning.
    if machine.kind == "cpu" and name == "cpu":
        return _unavailable(name, label, "no GPU: 'resident' and 'sequential' already run on the CPU")
    peak = _peak(name, models, precision, machine)
    fits = _fits(peak, machine)
    seconds = run_seconds(models, precision, machine, tokens, stream_weights=name == "cpu")
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
    )


def min_gpus_anywhere(models, precision: str | None, machine: Machine, limit: int = 4096) -> int | None:
    """Resident GPUs needed ignoring the one-machine limit (for 'beyond one machine')."""
    if machine.kind == "cpu":
        return None
    lo_guess = sum(m.weights[_p(m, precision)].gib for m in models) / machine.device_gib
    for n in range(max(1, int(lo_guess)), limit + 1):
        trial = machine.with_count(n)
        if _fits(resident_peak(models, precision, trial), trial):
            return n
    return None
