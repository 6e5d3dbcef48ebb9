"""Peak memory, fit, minimum GPU count, time and cost of each strategy.

Strategies, in the order the planner prefers them:
- ``resident``: both models loaded at once, on one GPU or split by layers over the
  machine's GPUs (accelerate ``device_map``/``max_memory``);
- ``sequential``: one model at a time on the GPU(s); the first model's residuals
  wait in host RAM while it is swapped out for the second;
- ``nf4``: bitsandbytes 4-bit weights, resident if that fits, else sequential;
- ``stream``: layer-major, the two models in lockstep: each decoder block is read from
  the safetensors checkpoint straight to one GPU, every prompt runs through it, and it
  is freed while the next block (of the other model) is read in the background; the
  hidden states of all prompts wait in host RAM (``stream_peak``). Uses one GPU
  whatever the count, needs a safetensors checkpoint and runs in the activation dtype
  (an FP8 checkpoint is dequantized tensor by tensor as it arrives).
Split over N GPUs, each GPU holds the whole modules the greedy layout gives it
(``layout.py``: what the executed device map will be), its share of the captured
residuals, the full forward transient (worst case: the last GPU computes the logits)
and its own context.
"""

from dataclasses import dataclass
from typing import Any

from lens_compare.hardware.estimate import ModelEstimate, cast_source_bytes
from lens_compare.hardware.layout import Layout, place
from lens_compare.hardware.machine import MAX_GPUS_PER_MACHINE, Machine
from lens_compare.hardware.precision import weight_bytes
from lens_compare.hardware.run_memory import (
    CAST_SOURCE_RESIDENT,
    CUDA_CONTEXT_GIB,
    MARGIN,
    RUN_SETUP_HOST_GIB,
    Workload,
)
from lens_compare.hardware.timing import run_cost, run_seconds, stream_seconds
from lens_compare.models.architecture import Architecture
from lens_compare.models.params import TensorGroup, block_groups, model_groups
from lens_compare.util.choices import DTYPE_BYTES
from lens_compare.util.units import FP8_CHUNK_ELEMENTS, GIB, gib

STREAM_NEEDS_SAFETENSORS = (
    "needs a safetensors checkpoint; convert the GGUF with `python -m lens_compare.convert SRC OUT`"
)
STREAM_NO_NF4 = "streams the checkpoint's own weights in the activation dtype; it cannot load a side as NF4"
STREAM_NO_RULE = "model_type {!r} has no streaming rule (lens_compare/models/families.py StreamRule)"


@dataclass(frozen=True)
class Peak:
    device_gib: float
    host_gib: float
    layout: str
    # A split over several GPUs: the layouts the device maps will follow (one for both
    # models when resident, one per model when sequential), None when not split.
    splits: tuple[Layout, ...] | None = None
    # The device memory of each phase of the run (overheads included), whose largest is the
    # peak: what benchmarks/bench_planner_memory.py measures phase by phase.
    phases: dict[str, float] | None = None


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
    # The layout at ``min_gpus`` GPUs, which may differ from ``layout`` on this machine
    # (nf4 resident on 8 GPUs, sequential on its minimum of 3).
    min_gpus_layout: str | None = None
    # Each phase's device GiB on this machine (see Peak.phases).
    phases: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "min_gpus": self.min_gpus,
            "min_gpus_layout": self.min_gpus_layout,
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
            "phases_gib": None if self.phases is None else {k: round(v, 4) for k, v in self.phases.items()},
        }


def _p(model: ModelEstimate, precision: str | None) -> str:
    """The weight precision of ``model``: its own unless the strategy imposes one (nf4)."""
    return precision or model.precision


def _load(model: ModelEstimate, precision: str | None) -> float:
    """Host memory the load of ``model`` adds on top of its weights, in that precision."""
    if _p(model, precision) == "nf4":
        return model.terms.nf4_load_transient
    return model.terms.load_transient


def _mapped(m: ModelEstimate, precision: str | None) -> bool:
    """Whether ``m``'s weights load as memory-mapped views of its checkpoint (stored in the run's dtype:
    a safetensors checkpoint, or a GGUF's dequantized float32 copy in a float32 run), which the
    host reads page by page only when a forward first touches them."""
    if _p(m, precision) == "nf4":
        return False
    stored = ("float32" if m.checkpoint.gguf_cached else None) if m.checkpoint.precision == "gguf" \
        else m.checkpoint.precision
    return stored == m.dtype


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
                  balanced: bool = True, workload: Workload | None = None) -> Peak:
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
    # On the CPU the run's own host memory shares the one memory with the weights, and weights
    # memory-mapped as they are stored are not read (resident) until the first forward.
    loaded = sum(0.0 if _mapped(m, p) else m.weights[_p(m, p)].gib for m in models) if on_cpu and n == 1 \
        else weights
    host = RUN_SETUP_HOST_GIB + sum(m.terms.bridge_host for m in models) if on_cpu else 0.0
    lens = sum(m.terms.logit_lens for m in models) / n
    phases = {
        "load": loaded + load + host,
        "forward": weights + residuals + transient + host,
        "metrics": weights + residuals + upcast + host,
        "lens": weights + residuals + lens + host,
        **_noise_floor_phase(models, machine, workload),
    }
    phases = {name: _with_overheads(value, machine) for name, value in phases.items()}
    return Peak(max(phases.values()), 0.0, "resident", splits, phases)


def _noise_floor_phase(models: tuple[ModelEstimate, ...], machine: Machine,
                       workload: Workload | None) -> dict[str, float]:
    """The noise floor (``--noise-floor``), after the run's models are released: the SFT model again in
    the second precision, one shard's forward, and (in host memory) the run's SFT states of that
    shard beside the floor's own and their metrics. Empty without a floor."""
    sft = models[-1]
    second = workload.noise_floor if workload is not None else None
    if not second:
        return {}
    weights = gib(sft.params.total * DTYPE_BYTES[second])
    # Its load maps the checkpoint and casts it when it holds another dtype (the run's host memory).
    load = CAST_SOURCE_RESIDENT * gib(cast_source_bytes(sft.checkpoint, second, sft.weights))
    host = 2 * sft.terms.residuals + sft.terms.metrics_upcast + RUN_SETUP_HOST_GIB + sft.terms.bridge_host + load
    return {"noise floor": weights + sft.terms.forward_transient + (host if machine.kind == "cpu" else 0.0)}


def sequential_peak(models: tuple[ModelEstimate, ...], p: str | None, machine: Machine,
                    balanced: bool = True, workload: Workload | None = None) -> Peak:
    n = machine.count
    residuals_all = sum(m.terms.residuals for m in models)
    metrics = residuals_all + sum(m.terms.metrics_upcast for m in models)
    phases, layouts = {}, []
    kept_head = 0.0
    # The logit lens runs with the second model loaded, the first one's head kept beside it.
    lens = sum(m.terms.logit_lens for m in models)
    for index, m in enumerate(models):
        last = index == len(models) - 1
        role = ("base", "sft")[index] if len(models) == 2 else f"model{index}"
        if machine.kind == "cpu":
            weights = m.weights[_p(m, p)].gib + RUN_SETUP_HOST_GIB + m.terms.bridge_host
            # Host and device are one memory: earlier residuals stay beside the model.
            phases[f"{role} load"] = weights + _load(m, p) + residuals_all + kept_head
            phases[f"{role} forward"] = weights + residuals_all + m.terms.forward_transient + kept_head
            phases[f"{role} metrics"] = weights + metrics + kept_head
            if last and lens:
                phases["lens"] = weights + residuals_all + kept_head + lens
            kept_head = m.terms.head  # the logit lens keeps the first model's head for the second
            continue
        other = m.terms.residuals / n + max(m.terms.forward_transient, lens / n if last else 0.0) + kept_head
        kept_head = m.terms.head
        if n == 1:
            weights = m.weights[_p(m, p)].gib
        else:
            weights, layout = _split_weights((m,), p, machine, other, balanced)
            layouts.append(layout)
        phases[role] = weights + other
    host = 0.0 if machine.kind == "cpu" else metrics + max(_load(m, p) for m in models)
    splits = tuple(layouts) if layouts and all(layouts) else None
    phases.update(_noise_floor_phase(models, machine, workload))
    phases = {name: _with_overheads(value, machine) for name, value in phases.items()}
    return Peak(max(phases.values()), host, "sequential", splits, phases)


def _largest_tensor_numel(arch: Architecture) -> int:
    """Elements of the biggest single weight of a block as the checkpoint stores it (one
    expert's matrix at a time: the merged expert tensors are stacked from them)."""
    largest = 0
    for moe in {False, arch.rule.moe}:
        for g in block_groups(arch, 1, moe):
            per_tensor = g.numel // g.copies
            if g.kind == "experts":
                per_tensor //= g.shape[0]
            largest = max(largest, per_tensor)
    return largest


def _stored(m: ModelEstimate, groups: list[TensorGroup]) -> int:
    """Bytes of ``groups`` as the checkpoint stores them."""
    return weight_bytes(groups, m.checkpoint.precision, fp8_block=m.checkpoint.fp8_block).total


def _run(m: ModelEstimate, groups: list[TensorGroup]) -> int:
    """Bytes of ``groups`` in the activation dtype the stream runs in."""
    return weight_bytes(groups, m.dtype).total


def _arrival_bytes(m: ModelEstimate) -> int:
    """The one checkpoint tensor in flight while a block is read: as stored, beside its place
    in the block's run-dtype tensors; for FP8, plus the dequantization's float32 temporaries
    (three of ``FP8_CHUNK_ELEMENTS``: ``lens_compare.models.fp8`` works a chunk of rows at a time)."""
    source = m.checkpoint.precision
    if source == m.dtype:
        return 0
    stored = _largest_tensor_numel(m.arch) * (1 if source == "fp8" else DTYPE_BYTES[source])
    return stored + (3 * 4 * FP8_CHUNK_ELEMENTS if source == "fp8" else 0)


def _block_read_bytes(m: ModelEstimate) -> int:
    """Device bytes of one block while it is read and built (``StreamedModel.read_state_dict``):
    its tensors in the run dtype (fused experts filled in place, slice by slice) plus the
    checkpoint tensor being converted."""
    worst = max(_run(m, block_groups(m.arch, 1, moe)) for moe in {False, m.arch.rule.moe})
    return worst + _arrival_bytes(m)


def _embedding_read_bytes(m: ModelEstimate) -> int:
    """The token (and learned position) embeddings while they are read: as stored (16-bit
    in an FP8 checkpoint) and cast to the activation dtype, both while the cast runs."""
    groups = [g for g in model_groups(m.arch) if g.kind == "embedding"]
    stored = "bfloat16" if m.checkpoint.precision == "fp8" else m.checkpoint.precision
    return _run(m, groups) + (_stored(m, groups) if stored != m.dtype else 0)


def _contexts_bytes(m: ModelEstimate, held: int, tokens: int) -> int:
    """What ``StreamedModel.contexts`` keeps on the device for every batch of one model:
    the eager causal masks ([b, 1, T, T] per mask kind; ``layer_types`` families may add a
    sliding-window mask, counted whether or not the config slides) and the rotary
    cos/sin ([b, T, rotary_dim] each), in the activation dtype."""
    kinds = 2 if m.arch.rule.stream is not None and m.arch.rule.stream.masks == "layer_types" else 1
    return (kinds * held * tokens**2 + 2 * held * tokens * m.arch.rotary_dim) * DTYPE_BYTES[m.dtype]


def stream_peak(models: tuple[ModelEstimate, ...], machine: Machine, workload: Workload) -> Peak:
    """Device and host memory of the layer-major streamed run (``lens_compare.engines.stream``).

    Device, in the activation dtype (an FP8 checkpoint is dequantized as it arrives):
    - weights: the larger of the embedding phase (each model's embeddings alone, nothing
      prefetched) and the block phase: the block computing plus the next one, of the
      other model, being read on the background thread (``_block_read_bytes``); the
      largest of either model for both;
    - the in-flight forward batch: its input and output hidden states (2 x b x T x d)
      and one block's forward transient (attention scores + activations, no logits);
    - each model's masks and rotary embeddings of every batch (``_contexts_bytes``),
      built once and kept for the whole run.
    Host: per model two residual states of every held prompt (2 x B x T x d x act
    bytes), the float32 metrics (``metrics_upcast``: per-token metrics of every state
    plus one state's float32 working copies), and the run's set-up. Neither part grows
    with the number of GPUs: stream uses one. On the CPU both parts share one memory.
    """
    tokens, held = workload.tokens, workload.batch
    forward_batch = min(workload.forward_batch or held, held)
    embedding = max(_embedding_read_bytes(m) for m in models)
    blocks = max(m.largest_block[m.dtype].total for m in models) + max(_block_read_bytes(m) for m in models)
    in_flight = max(
        gib(2 * forward_batch * tokens * m.arch.d_model * DTYPE_BYTES[m.dtype])
        + m.terms.attention_scores + m.terms.activations
        for m in models
    )
    contexts = gib(sum(_contexts_bytes(m, held, tokens) for m in models))
    # The logit lens reads both heads before the first block; they stay on the device throughout,
    # and its chunk's working tensors join them after a shard's last block.
    heads = sum(m.terms.head for m in models)
    phases = {
        "embed": gib(embedding) + contexts + heads,
        "blocks": gib(blocks) + in_flight + contexts + heads,
        "lens": heads + sum(m.terms.logit_lens for m in models) + contexts,
    }
    # Two states of each model, and the lensed states kept for the lens when held in memory.
    host = RUN_SETUP_HOST_GIB + sum(
        gib((2 + workload.kept_states) * held * tokens * m.arch.d_model * DTYPE_BYTES[m.dtype])
        + m.terms.metrics_upcast for m in models
    )
    if machine.kind == "cpu":
        phases = {name: _with_overheads(value + host, machine) for name, value in phases.items()}
        return Peak(max(phases.values()), 0.0, "stream", None, phases)
    phases = {name: _with_overheads(value, machine) for name, value in phases.items()}
    return Peak(max(phases.values()), host, "stream", None, phases)


def _fits(peak: Peak, machine: Machine) -> bool:
    return peak.device_gib <= machine.device_gib and peak.host_gib <= machine.host_ram_gib


def _peak(name: str, models, p: str | None, machine: Machine, workload: Workload,
          balanced: bool = True) -> Peak:
    if name == "stream":
        return stream_peak(models, machine, workload)
    if name == "resident":
        return resident_peak(models, p, machine, balanced, workload)
    if name == "sequential":
        return sequential_peak(models, p, machine, balanced, workload)
    # nf4: resident when both models fit, else sequential.
    peak = resident_peak(models, p, machine, balanced, workload)
    return peak if _fits(peak, machine) else sequential_peak(models, p, machine, balanced, workload)


def min_gpus(name: str, models, p: str | None, machine: Machine, workload: Workload,
             limit: int = MAX_GPUS_PER_MACHINE) -> int | None:
    """Fewest GPUs of this type that fit, up to ``limit``; None if none suffice.

    ``stream`` computes on one GPU: more only count for a rented node's host RAM. A strategy
    that fits on n GPUs fits on more (each holds a smaller share), so the count is bisected.
    """
    if machine.kind == "cpu":
        return 1 if _fits(_peak(name, models, p, machine, workload), machine) else None

    def fits(n: int) -> bool:
        trial = machine.with_count(n)
        return _fits(_peak(name, models, p, trial, workload, balanced=False), trial)

    return _fewest(fits, 1, limit) if fits(limit) else None


def _fewest(fits, low: int, high: int) -> int:
    """The smallest n in [low, high] with ``fits(n)``, given that ``fits(high)`` and that fit only
    improves with n (more GPUs each hold a smaller share)."""
    while low < high:
        middle = (low + high) // 2
        if fits(middle):
            high = middle
        else:
            low = middle + 1
    return high


def _unavailable(name: str, precision: str, reason: str) -> StrategyResult:
    return StrategyResult(name, precision, "n/a", False, None, 0.0, 0.0, 0.0, None, None, reason)


def evaluate(name: str, models: tuple[ModelEstimate, ...], precision: str | None, machine: Machine,
             workload: Workload) -> StrategyResult:
    """One strategy on ``machine``; ``precision`` None keeps each model's own precision
    (``stream`` always runs in the activation dtype)."""
    label = precision or "/".join(dict.fromkeys(m.precision for m in models))
    if name == "stream":
        label = "/".join(dict.fromkeys(m.dtype for m in models))
        if any(m.checkpoint.precision == "gguf" for m in models):
            return _unavailable(name, label, STREAM_NEEDS_SAFETENSORS)
        if any(m.precision == "nf4" for m in models):
            return _unavailable(name, label, STREAM_NO_NF4)
        unruled = [m.arch.model_type for m in models if m.arch.rule.stream is None]
        if unruled:
            return _unavailable(name, label, STREAM_NO_RULE.format(unruled[0]))
    peak = _peak(name, models, precision, machine, workload)
    fits = _fits(peak, machine)
    fewest = min_gpus(name, models, precision, machine, workload)
    if name == "stream":
        seconds = stream_seconds(models, machine, workload)
    else:
        seconds = run_seconds(models, precision, machine, workload)
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
        min_gpus=fewest,
        min_gpus_layout=None if fewest is None else _peak(name, models, precision, machine.with_count(fewest),
                                                          workload, balanced=False).layout,
        peak_gib_per_gpu=peak.device_gib,
        host_gib=peak.host_gib,
        headroom_gib=machine.device_gib - peak.device_gib,
        est_seconds=seconds,
        est_cost_usd=run_cost(seconds, machine),
        reason=reason,
        splits=peak.splits if fits else None,
        phases=peak.phases,
    )


def min_gpus_anywhere(models, precision: str | None, machine: Machine, limit: int = 4096) -> int | None:
    """Resident GPUs needed ignoring the one-machine limit (for 'beyond one machine').

    Fit only improves with more GPUs (each takes a smaller share of the same modules), so
    the count is found by doubling from the weights' own lower bound, then bisecting."""
    if machine.kind == "cpu":
        return None

    def fits(n: int) -> bool:
        trial = machine.with_count(n)
        return _fits(resident_peak(models, precision, trial, balanced=False), trial)

    low = max(1, int(sum(m.weights[_p(m, precision)].gib for m in models) / machine.device_gib))
    high = low
    while not fits(high):
        if high >= limit:
            return None
        low, high = high + 1, min(2 * high, limit)
    return _fewest(fits, low, high)
