"""Before any weights load: the local_run guard, and the planner's verdict turned into an execution.

``memory_preflight`` gets the facts the pipeline has gathered without loading weights
(the models' configs, token counts, dtypes, device and GPUs, captured layers) and asks
the hardware planner what runs on this machine. It returns the ``Execution``: the
schedule, and how each model is loaded (one device, split over GPUs by a device map
computed here from the planner's layout, NF4, or streamed block by block from the checkpoint).
Whatever cannot run is refused here with the planner's explanation, before a single weight is read.
"""

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from lens_compare.errors import HardwareError, UnsupportedArchitectureError
from lens_compare.hardware import Machine, Workload, plan_models
from lens_compare.hardware.local_run import (
    LocalRunApproval,
    LocalRunConfig,
    check_local_run,
    query_cuda_device,
)
from lens_compare.hardware.machine import detect_gpus, host_ram_gib
from lens_compare.hardware.planner import Plan
from lens_compare.hardware.precision import floor_dtype
from lens_compare.hardware.run_memory import CUDA_CONTEXT_GIB
from lens_compare.hardware.sources import ModelSource, checkpoint_of
from lens_compare.pipeline.execution import Execution, PlanFacts, default_execution, side_loads
from lens_compare.util.hooks import states_for_layers
from lens_compare.util.units import GIB, LOGIT_LENS_CHUNK_BYTES

logger = logging.getLogger("lens_compare")


def machine_for(device: str, gpus: tuple[int, ...]) -> Machine:
    """The machine the models will actually be placed on: the selected GPUs, or this host's RAM."""
    if device == "cpu":
        _, available = host_ram_gib()
        return Machine("cpu", 1, available, available)
    return detect_gpus(gpus, CUDA_CONTEXT_GIB)


def _source(side, config, device: str) -> ModelSource:
    gguf_bytes = (Path(side.ref.location) / side.ref.gguf_file).stat().st_size if side.ref.gguf_file else 0
    checkpoint = checkpoint_of(config, gguf_bytes)
    if gguf_bytes:
        from lens_compare.models.gguf import weights_cached

        checkpoint = replace(checkpoint, gguf_cached=weights_cached(side.ref))
    if device == "cpu":
        from lens_compare.models.quantization import nf4_cache_dir

        checkpoint = replace(checkpoint, nf4_cached=nf4_cache_dir(side.ref, side.dtype).is_dir())
    return ModelSource(side.ref.spec, config, checkpoint)


def _plan(facts: PlanFacts, machine: Machine, strategy: str | None) -> Plan:
    base, sft = facts.base, facts.sft
    held = facts.held_prompts or facts.n_prompts
    workload = Workload(
        tokens=facts.max_tokens,
        batch=held,
        forward_batch=min(facts.batch_size, held),
        prompts=facts.n_prompts,
        base_dtype=base.dtype,
        sft_dtype=sft.dtype,
        states=len(states_for_layers(facts.layers)),
        components=2 * len(facts.layers) if facts.components else 0,
        logit_lens=facts.logit_lens,
        lens_layers=facts.lens_layers,
        lens_final_only=facts.lens_mode == "final",
        lens_chunk_bytes=facts.lens_chunk_bytes,
        kept_states=facts.lens_kept_states,
        noise_floor=floor_dtype(sft.dtype) if facts.noise_floor else None,
    )
    return plan_models(
        _source(base, facts.configs["base"], facts.device),
        _source(sft, facts.configs["sft"], facts.device),
        workload,
        machine,
        strategy=strategy,
        pair=facts.pair,
        with_cheapest=False,
        side_precisions=(base.quantization, sft.quantization),
    )


def _alternatives(plan: Plan) -> str:
    where = (lambda r: "") if plan.machine.kind == "cpu" else (lambda r: f" on {r.min_gpus} GPU(s)")
    fitting = [f"{name}{where(r)}" for name, r in plan.strategies.items() if r.min_gpus is not None]
    return "; what fits instead: " + ", ".join(fitting) if fitting else "; nothing else fits either"


# The share of host RAM CKA's Gram matrices may take (the run's own states and the process share the rest).
CKA_HOST_SHARE = 0.5


def check_cka_memory(n_tokens: int, n_layers: int, machine: Machine) -> None:
    """CKA over ``n_tokens`` tokens (0: no CKA) holds one model's token x token Gram matrix of each of
    ``n_layers`` layers in host memory after the models ran: say so, and refuse a run whose matrices
    this machine cannot hold."""
    if not n_tokens:
        return
    from lens_compare.analyses.cka import gram_bytes

    need = gram_bytes(n_layers, n_tokens) / GIB
    logger.info("cka: %d tokens x %d layers: %.2f GiB of float64 Gram matrices in host memory after the models ran",
                n_tokens, n_layers, need)
    if need > CKA_HOST_SHARE * machine.host_ram_gib:
        raise HardwareError(
            f"refusing to start: --cka over {n_tokens:,} tokens needs {need:.1f} GiB of token x token Gram "
            f"matrices ({n_layers} layers), more than {CKA_HOST_SHARE:.0%} of this machine's "
            f"{machine.host_ram_gib:.1f} GiB of RAM; use fewer prompts or tokens (it grows with their square), "
            "fewer --layers, or drop --cka"
        )


def check_noise_floor_memory(facts: PlanFacts, machine: Machine) -> None:
    """The noise floor loads the SFT model once more in its second precision, after the run's
    models are released: on the run's GPU when it fits there, else in host RAM. Refuse, before
    any model loads, a floor neither can hold."""
    from lens_compare.engines.noise_floor import floor_bytes

    second = floor_dtype(facts.sft.dtype)
    need = floor_bytes(facts.configs["sft"], second) / GIB
    room = max(machine.device_gib if machine.kind == "cuda" else 0.0, machine.host_ram_gib)
    logger.info("noise floor: the SFT model once more in %s, ~%.2f GiB", second, need)
    if need > room:
        raise HardwareError(
            f"refusing to start: --noise-floor runs the SFT model once more in {second} (~{need:.1f} GiB with its "
            f"forward), which fits neither this machine's GPU nor its {machine.host_ram_gib:.1f} GiB of RAM; drop "
            "--noise-floor, or measure the floor with --strategy stream (block by block)"
        )


def memory_preflight(facts: PlanFacts) -> Execution:
    """The execution for this run on this machine, or HardwareError with the planner's explanation."""
    base, sft = facts.base, facts.sft
    requested = None if facts.strategy == "auto" else facts.strategy
    if requested == "nf4" or base.quantization or sft.quantization:
        from lens_compare.models.quantization import require_bitsandbytes

        require_bitsandbytes()
    machine = machine_for(facts.device, facts.gpus)
    check_cka_memory(facts.cka_tokens, len(facts.layers), machine)
    try:
        plan = _plan(facts, machine, requested)
    except UnsupportedArchitectureError as error:
        # The pipeline runs any architecture TransformerLens bridges; the planner only
        # models the seed's families. Say so loudly rather than refuse a runnable pair.
        execution = default_execution(facts)
        logger.warning("no memory check for this run: %s Running %s without a plan.", error, execution.strategy)
        return execution
    if plan.strategy is None:
        # The whole plan goes to the log; the error says what decided it.
        logger.info("hardware plan:\n%s", plan.explain())
        if requested:
            result = plan.strategies[requested]
            # An unavailable strategy (layout "n/a": a GGUF cannot stream) is not a memory verdict.
            verdict = "cannot run this pair" if result.layout == "n/a" else "does not fit"
            raise HardwareError(f"refusing to load: the {requested!r} strategy {verdict} on {plan.machine.label}: "
                                f"{result.reason or 'it does not fit'}{_alternatives(plan)}")
        reasons = "; ".join(f"{name}: {r.reason}" for name, r in plan.strategies.items() if name != "nf4")
        nf4_fits = plan.strategies["nf4"].fits
        nf4 = " (nf4 would fit: --strategy nf4, read against the NF4 noise floor)" if nf4_fits else ""
        raise HardwareError(f"refusing to load: nothing fits on {plan.machine.label}{nf4}; {reasons}")
    chosen = plan.chosen
    if machine.kind == "cuda" and chosen.min_gpus is not None and chosen.min_gpus < machine.count:
        # Split over no more GPUs than needed: fewer hops, and the rest stay free.
        machine = machine.with_count(chosen.min_gpus)
        plan = _plan(facts, machine, chosen.name)
        chosen = plan.chosen
    lens_chunk = LOGIT_LENS_CHUNK_BYTES
    if facts.logit_lens:
        # The lens's chunks take half of what the plan leaves free (within bounds), and are planned so.
        budget = lens_chunk_budget(machine.device_gib - chosen.peak_gib_per_gpu)
        sized = _plan(replace(facts, lens_chunk_bytes=budget), machine, chosen.name)
        if sized.chosen is not None:
            plan, chosen, lens_chunk = sized, sized.chosen, sized.workload.lens_chunk_bytes
    schedule = "stream" if chosen.name == "stream" else "resident" if chosen.layout == "resident" else "sequential"
    if facts.noise_floor and schedule != "stream":
        check_noise_floor_memory(facts, machine)
    gpus = facts.gpus[: machine.count]
    device = f"cuda:{gpus[0]}" if machine.kind == "cuda" else "cpu"
    loads = side_loads(facts, chosen.name, device)
    if machine.kind == "cuda" and machine.count > 1:
        from lens_compare.models.placement import split_loads

        loads = split_loads(loads, chosen, facts.configs, gpus, alternatives=_alternatives(plan))
    logger.info(plan.brief())
    estimate = {
        "machine": machine.label,
        "peak_gib_per_device": round(chosen.peak_gib_per_gpu, 3),
        "host_gib": round(chosen.host_gib, 3),
        "seconds": None if chosen.est_seconds is None else round(chosen.est_seconds, 1),
        "lens_chunk_mib": round(lens_chunk / 2**20, 1) if facts.logit_lens else None,
        # Everything the planner worked out (python -m lens_compare.plan prints the same as text).
        "plan": plan.to_dict(),
    }
    return Execution(chosen.name, schedule, loads, estimate, lens_chunk)


# The logit lens's chunk of working tensors: at least the planned default, at most this much.
LENS_CHUNK_MAX_BYTES = 2**30


def lens_chunk_budget(headroom_gib: float) -> int:
    """Bytes of the lens's working tensors per chunk of tokens: the planned default plus half the
    memory the plan leaves free, up to ``LENS_CHUNK_MAX_BYTES`` (larger chunks make larger, faster head
    products; past a few hundred tokens a chunk gains little), rounded down to a power of two."""
    extra = max(0.0, headroom_gib) * GIB / 2
    budget = int(min(LENS_CHUNK_MAX_BYTES, LOGIT_LENS_CHUNK_BYTES + extra))
    # A power of two: the same budget from run to run while the free memory merely fluctuates (the
    # chunk size can move the lens's head products at the rounding level).
    return max(LOGIT_LENS_CHUNK_BYTES, 1 << (budget.bit_length() - 1))


def local_run_approval(block: dict[str, Any] | None, base: str, sft: str) -> LocalRunApproval | None:
    """The seed's guard: None when disabled; otherwise approve on this GPU or raise HardwareError."""
    if not block:
        return None
    config = LocalRunConfig.from_dict(block)
    if not config.enabled:
        return None
    approval = check_local_run(config, base, sft, query_cuda_device(config.cuda_device_index))
    logger.info(approval.log_line)
    return approval
