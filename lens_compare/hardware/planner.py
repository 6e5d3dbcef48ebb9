"""The plan: what a pair needs, every strategy on the machine at hand, and the choice.

>>> plan = plan_pair("qwen7b", tokens=250, gpu="A100 80GB")
>>> plan.strategy, plan.strategies["resident"].min_gpus
('resident', 1)
"""

from dataclasses import dataclass
from typing import Any

from lens_compare.errors import ConfigError, HardwareError, UnsupportedArchitectureError
from lens_compare.hardware.estimate import ModelEstimate, estimate_model
from lens_compare.hardware.gpus import gpu_catalog
from lens_compare.hardware.machine import (
    MAX_GPUS_PER_MACHINE,
    Machine,
    catalog_machine,
    detect_machine,
)
from lens_compare.hardware.precision import check_precision
from lens_compare.hardware.run_memory import Workload, skip_savings_gib
from lens_compare.hardware.sources import ModelSource, checkpoint_of, pair_sources, resolve_source
from lens_compare.hardware.strategies import (
    StrategyResult,
    evaluate,
    min_gpus_anywhere,
)
from lens_compare.hardware.timing import forward_seconds, lens_seconds, run_seconds, steering_seconds, stream_seconds
from lens_compare.models.architecture import architecture_from_config
from lens_compare.models.pairs import get_pair
from lens_compare.util.choices import DTYPES, STRATEGIES

# What ``auto`` tries, in order. nf4 changes the residual stream itself, so auto never
# picks it: it runs when requested, or when both sides of the pair load as NF4 already.
AUTO_ORDER: tuple[str, ...] = ("resident", "sequential", "stream")
NF4_SIDES_ORDER: tuple[str, ...] = ("resident", "sequential", "nf4")

STREAM_NOTE = (
    "stream reads each checkpoint once, block by block, to one GPU (or the CPU) and runs every prompt through "
    "each block in lockstep with the other model; its time is bounded by the disk read, and it "
    "writes the newest residual state of every prompt after each block so a killed run resumes there."
)

NF4_CAVEAT = (
    "nf4: 4-bit weights change the residual stream itself, so NF4 base-vs-SFT drift must be "
    "read against the NF4 noise floor of the same model (pair it with its own NF4 copy, as the "
    "smollm2-nf4 demo pair does)."
)


@dataclass(frozen=True)
class Plan:
    pair: str | None
    base: ModelEstimate
    sft: ModelEstimate
    workload: Workload
    machine: Machine
    strategies: dict[str, StrategyResult]
    strategy: str | None
    beyond_one_machine: dict[str, int | None] | None
    cheapest: dict[str, Any] | None
    notes: tuple[str, ...]
    # The strategy the caller forced (None: the planner's pick, ``--strategy auto``).
    requested: str | None = None

    @property
    def chosen(self) -> StrategyResult | None:
        return self.strategies[self.strategy] if self.strategy else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schema": "lens_compare.plan/1",
            "pair": self.pair,
            "base": self.base.ref,
            "sft": self.sft.ref,
            "tokens": self.workload.tokens,
            "batch": self.workload.batch,
            "dtype": {"base": self.base.dtype, "sft": self.sft.dtype},
            "base_params": self.base.params.total,
            "sft_params": self.sft.params.total,
        }
        for side, m in (("base", self.base), ("sft", self.sft)):
            if m.arch.rule.moe:
                out[f"{side}_active_params"] = m.params.active
            if m.params.mtp:
                out[f"{side}_mtp_params"] = m.params.mtp
        out["weights_gib"] = {
            side: {p: round(w.gib, 4) for p, w in m.weights.items()}
            for side, m in (("base", self.base), ("sft", self.sft))
        }
        out["run_gib"] = {
            side: {k: round(v, 5) for k, v in m.terms.to_dict().items()}
            for side, m in (("base", self.base), ("sft", self.sft))
        }
        out["strategies"] = {name: r.to_dict() for name, r in self.strategies.items()}
        out["strategy"] = self.strategy
        out["gpus"] = {**self.machine.to_dict()}
        out["beyond_one_machine"] = self.beyond_one_machine
        out["cheapest"] = self.cheapest
        out["notes"] = list(self.notes)
        return out

    def brief(self) -> str:
        """The plan in the few lines a run logs: the choice with its peak and time, what else fits, and
        the notes that apply to this run (``explain()`` has everything, the JSON's provenance too)."""
        chosen = self.chosen
        others = []
        for name, r in self.strategies.items():
            if name == self.strategy or (name == "nf4" and chosen is not None and chosen.name != "nf4"):
                continue  # nf4 is never picked for a run unless asked for: it changes the numbers
            others.append(f"{name} {r.peak_gib_per_gpu:.2f} GiB" if r.fits else f"{name}: {r.reason or 'does not fit'}")
        head = (f"plan: {chosen.name} on {self.machine.label}: peak ~{chosen.peak_gib_per_gpu:.2f} GiB"
                + (f", ~{chosen.est_seconds:.0f} s" if chosen.est_seconds is not None else "")
                + (f", ~${chosen.est_cost_usd:.4f}" if chosen.est_cost_usd is not None else "")
                if chosen is not None else f"plan: nothing fits on {self.machine.label}")
        lines = [head + (f" (also: {'; '.join(others)})" if others else "")]
        lines += [f"note: {note}" for note in self.notes if _applies_to_run(note, chosen)]
        return "\n".join(lines)

    def explain(self) -> str:
        """The plan as text: params, weights, run terms, each strategy, the choice."""
        lines = [f"pair: {self.pair or '-'}  ({self.base.ref} vs {self.sft.ref})",
                 f"workload: {self.workload.tokens} tokens x {self.workload.batch} prompt(s)",
                 f"machine: {self.machine.label}"]
        for side, m in (("base", self.base), ("sft", self.sft)):
            active = f", {m.params.active / 1e9:.2f}B active" if m.arch.rule.moe else ""
            mtp = f" (+{m.params.mtp / 1e9:.2f}B MTP in the checkpoint, not loaded)" if m.params.mtp else ""
            lines.append(
                f"{side}: {m.arch.model_type}, {m.params.total:,} params{active}{mtp}; "
                f"weights {m.weights[m.precision].gib:.2f} GiB in {m.precision} "
                f"(bf16 {m.weights['bfloat16'].gib:.2f}, fp8 {m.weights['fp8'].gib:.2f}, "
                f"nf4 {m.weights['nf4'].gib:.2f})"
            )
            t = m.terms
            lines.append(
                f"  run terms (GiB, {m.dtype}): residuals {t.residuals:.4f}, metrics upcast "
                f"{t.metrics_upcast:.4f}, logits {t.logits:.4f}, attention {t.attention_scores:.4f}, "
                f"activations {t.activations:.4f}, load transient {t.load_transient:.4f} "
                f"(nf4 {t.nf4_load_transient:.4f})"
                + (f", logit lens {t.logit_lens:.4f} (head {t.head:.4f})" if t.logit_lens else "")
            )
        for name, r in self.strategies.items():
            mark = "fits" if r.fits else "does not fit"
            detail = r.reason or f"peak {r.peak_gib_per_gpu:.2f} GiB/device, headroom {r.headroom_gib:.2f}"
            at_min = f" ({r.min_gpus_layout} layout there)" if r.min_gpus_layout not in (None, r.layout) else ""
            extra = f"; min GPUs {r.min_gpus}{at_min}" if r.min_gpus else "; no count on one machine suffices"
            cost = f", ~${r.est_cost_usd:.4f}" if r.est_cost_usd is not None else ""
            secs = f", ~{r.est_seconds:.0f} s{cost}" if r.est_seconds is not None else ""
            # nf4 runs resident or sequential: say which layout its figures are for.
            layout = f", {r.layout} layout" if r.layout not in (name, "n/a") else ""
            lines.append(f"  {name:<10} [{r.precision}{layout}] {mark}: {detail}{extra}{secs}")
            for index, layout in enumerate(r.splits or ()):
                whose = "both models" if len(r.splits) == 1 else ("base", "sft")[index]
                per_gpu = ", ".join(f"{b / 2**30:.1f}" for b in layout.per_gpu)
                lines.append(f"             split of {whose}, GiB of weights per GPU: {per_gpu}")
        if self.strategy:
            lines.append(f"chosen: {self.strategy} on {self.machine.label}")
        elif self.requested:
            lines.append(f"the {self.requested!r} strategy does not fit on {self.machine.label}")
        else:
            lines.append(f"nothing fits on {self.machine.label}")
            if "nf4" in self.strategies and self.strategies["nf4"].fits:
                lines.append("nf4 fits: it is never picked by auto, because 4-bit weights change the numbers; "
                             "request it with --strategy nf4 and read its drift against the NF4 noise floor")
        if self.beyond_one_machine:
            need = ", ".join(f"{n if n else '>4096'} GPUs in {p}" for p, n in self.beyond_one_machine.items())
            lines.append(f"beyond one machine of {self.machine.device_name}: resident (both models loaded at once) "
                         f"needs {need}")
        if self.cheapest:
            c = self.cheapest
            lines.append(f"cheapest priced choice: {c['count']}x {c['gpu']} ({c['strategy']}), "
                         f"~{c['est_seconds']:.0f} s, ~${c['est_cost_usd']:.4f} per run")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _applies_to_run(note: str, chosen: StrategyResult | None) -> bool:
    """Whether a plan note concerns the run about to start (the plan command prints them all)."""
    if note == NF4_CAVEAT or "bitsandbytes quantizes nn.Linear only" in note:
        return chosen is not None and chosen.name == "nf4"
    if note.startswith("skipping capture of the first"):
        return chosen is None  # about weights that do not fit
    if note == STREAM_NOTE:
        return chosen is not None and chosen.name == "stream"
    return not note.startswith(("est_seconds:", "host RAM assumed"))


def _default_precision(source: ModelSource, dtype: str, machine: Machine, explicit: bool) -> str:
    if explicit:
        return dtype
    if source.checkpoint.precision == "fp8" and machine.gpu is not None and machine.gpu.fp8:
        return "fp8"
    return dtype


def _notes(base: ModelEstimate, sft: ModelEstimate, machine: Machine, workload: Workload,
           chosen: StrategyResult | None) -> list[str]:
    notes = [NF4_CAVEAT]
    if chosen is not None and chosen.name == "stream":
        notes.append(STREAM_NOTE)
    for m in (base, sft) if base.ref != sft.ref and base.checkpoint != sft.checkpoint else (base,):
        if m.checkpoint.precision == "fp8" and m.precision != "fp8":
            notes.append(
                f"{m.ref} ships FP8 weights (block scales); {machine.device_name} "
                f"{'has no FP8 support, so they' if machine.gpu and not machine.gpu.fp8 else 'weights'} "
                f"are dequantized to {m.precision} at load."
            )
        if m.arch.rule.moe:
            notes.append(
                f"{m.ref}: bitsandbytes quantizes nn.Linear only; the fused routed-expert tensors "
                "(most of the parameters) stay 16-bit under nf4."
            )
        if m.checkpoint.note:
            notes.append(f"{m.ref}: {m.checkpoint.note}")
    if machine.gpu is not None and not machine.gpu.bf16 and "bfloat16" in (base.dtype, sft.dtype):
        notes.append(f"{machine.gpu.name} has no bf16 tensor cores; prefer --dtype float16 (same memory).")
    half = base.arch.n_layers // 2
    saved = skip_savings_gib(base.terms, base.arch, half) + skip_savings_gib(sft.terms, sft.arch, half)
    if chosen is not None:
        share = 100 * saved / max(chosen.peak_gib_per_gpu, 1e-9)
        notes.append(
            f"skipping capture of the first {half} layers saves only {saved:.4f} GiB "
            f"({share:.2f}% of the {chosen.peak_gib_per_gpu:.2f} GiB peak): not a fix for weights that do not fit."
        )
    if machine.kind == "cuda" and not machine.detected:
        notes.append(
            f"host RAM assumed {machine.host_ram_gib:.0f} GiB (2x the GPUs' memory); pass --host-ram-gib."
        )
    notes.append(
        "est_seconds: run set-up, then per model the checkpoint read from local disk at 2 GB/s, "
        "the bridge's boot and every prompt through it (max of weights/bandwidth and "
        "2 x active params x tokens at 40% of dense peak; on the CPU, GGUF dequantisation and "
        "NF4 quantizing or reading as measured on a 2-core host); stream: per model the larger of "
        "the checkpoint read and the prompts' compute, plus its frontier written at 1 GB/s after "
        "every block (see timing.py); cost = GPUs x hourly price x seconds, prices from the seed's notes."
    )
    return list(dict.fromkeys(notes))


def _cheapest(models: tuple[ModelEstimate, ...], workload: Workload, requested: Machine) -> dict[str, Any] | None:
    """The lowest-cost (GPU type, count, strategy) over the priced catalog.

    Strategies that leave the numbers untouched (resident, sequential, stream) are
    compared on cost alone; nf4 changes the residual stream, so it is offered only when
    nothing exact fits anywhere.
    """
    for allowed in (AUTO_ORDER, ("nf4",)):
        best = None
        for gpu in gpu_catalog().values():
            if gpu.price_per_hour is None:
                continue
            machine = catalog_machine(gpu.name, 1)
            for name in allowed:
                precision = "nf4" if name == "nf4" else None
                count = evaluate(name, models, precision, machine, workload).min_gpus
                if count is None:
                    continue
                result = evaluate(name, models, precision, machine.with_count(count), workload)
                if result.est_cost_usd is not None and (best is None or result.est_cost_usd < best["est_cost_usd"]):
                    best = {"gpu": gpu.name, "count": count, "strategy": name,
                            "est_seconds": result.est_seconds, "est_cost_usd": result.est_cost_usd}
        if best is not None:
            return best
    return None


def plan_models(
    base: ModelSource,
    sft: ModelSource,
    workload: Workload,
    machine: Machine,
    *,
    precision: str | None = None,
    strategy: str | None = None,
    pair: str | None = None,
    with_cheapest: bool = True,
    side_precisions: tuple[str | None, str | None] = (None, None),
    only: tuple[str, ...] = STRATEGIES,
) -> Plan:
    """Plan two resolved models; ``precision`` forces the weights of resident/sequential.
    ``only`` evaluates those strategies alone (the seed's table asks resident's GPU count of
    every GPU type, a thousand plans).

    ``side_precisions`` fixes one side's weights whatever the strategy (a noise-floor
    pair that loads its SFT side as NF4). ``strategy`` forces one strategy; without
    it the first that fits in ``AUTO_ORDER`` is chosen (``NF4_SIDES_ORDER`` when both
    sides are NF4: stream cannot load them so).
    """
    if precision is not None:
        check_precision(precision)
        if precision == "nf4":
            raise ConfigError("--dtype nf4 is a strategy, not a precision: use --strategy nf4")
    if strategy is not None and strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    estimates = []
    for source, dtype, fixed in ((base, workload.base_dtype, side_precisions[0]),
                                 (sft, workload.sft_dtype, side_precisions[1])):
        arch = architecture_from_config(source.config)
        chosen_precision = _default_precision(source, precision or dtype, machine, precision is not None)
        if chosen_precision == "fp8" and machine.gpu is not None and not machine.gpu.fp8:
            chosen_precision = "bfloat16"
        chosen_precision = fixed or chosen_precision
        estimates.append(estimate_model(source.ref, arch, source.checkpoint, dtype, chosen_precision, workload))
    models = tuple(estimates)
    results = {
        name: evaluate(name, models, "nf4" if name == "nf4" else None, machine, workload)
        for name in STRATEGIES if name in only
    }
    if strategy:
        order: tuple[str, ...] = (strategy,)
    else:
        order = NF4_SIDES_ORDER if all(p == "nf4" for p in side_precisions) else AUTO_ORDER
    chosen = next((n for n in order if n in results and results[n].fits), None)
    beyond = None
    if machine.kind == "cuda" and "resident" in results and results["resident"].min_gpus is None:
        # Both models resident needs more GPUs than one machine has: say how many, per precision.
        beyond = {}
        for p in ("bfloat16", "fp8", "nf4"):
            if p == "fp8" and machine.gpu is not None and not machine.gpu.fp8:
                continue
            beyond[p] = min_gpus_anywhere(models, p, machine)
    return Plan(
        pair=pair,
        base=models[0],
        sft=models[1],
        workload=workload,
        machine=machine,
        strategies=results,
        strategy=chosen,
        beyond_one_machine=beyond,
        cheapest=_cheapest(models, workload, machine) if with_cheapest else None,
        notes=tuple(_notes(models[0], models[1], machine, workload, results[chosen] if chosen else None)),
        requested=strategy,
    )


def sources_for(pair: str | None = None, base: str | None = None, sft: str | None = None,
                base_config: Any = None, sft_config: Any = None) -> tuple[ModelSource, ModelSource]:
    """Resolve what the caller has: loaded configs win, then refs, then the pair's entry."""
    spec = get_pair(pair) if pair else None
    if spec is not None:
        base, sft = base or spec.base, sft or spec.sft
    if base is None or sft is None:
        raise ConfigError("name a pair (--pair KEY) or both models (--base REF --sft REF)")
    if base_config is not None and sft_config is not None:
        return (ModelSource(base, base_config, checkpoint_of(base_config)),
                ModelSource(sft, sft_config, checkpoint_of(sft_config)))
    if spec is not None and (base, sft) == (spec.base, spec.sft):
        return pair_sources(spec)
    return resolve_source(base), resolve_source(sft)


def _workload(pair: str | None, tokens: int, batch: int, dtype: str | None,
              base_dtype: str | None, sft_dtype: str | None, states: int | None) -> Workload:
    spec = get_pair(pair) if pair else None
    default = dtype if dtype in DTYPES else "bfloat16"
    return Workload(
        tokens=tokens,
        batch=batch,
        base_dtype=base_dtype or (spec.base_dtype if spec and spec.base_dtype else default),
        sft_dtype=sft_dtype or (spec.sft_dtype if spec and spec.sft_dtype else default),
        states=states,
    )


def plan_pair(
    pair: str | None = None,
    *,
    base: str | None = None,
    sft: str | None = None,
    tokens: int = 250,
    batch: int = 1,
    gpu: str = "H100 SXM 80GB",
    count: int = 1,
    dtype: str | None = None,
    strategy: str | None = None,
    host_ram_gib: float | None = None,
    states: int | None = None,
    machine: Machine | None = None,
    with_cheapest: bool = True,
    only: tuple[str, ...] = STRATEGIES,
) -> Plan:
    """Plan a registered pair (or two model refs) for ``count`` GPUs of type ``gpu``."""
    machine = machine or catalog_machine(gpu, count, host_ram_gib)
    workload = _workload(pair, tokens, batch, dtype, None, None, states)
    precision = dtype if dtype in (*DTYPES, "fp8") else None
    b, s = sources_for(pair, base, sft)
    return plan_models(b, s, workload, machine, precision=precision, strategy=strategy,
                       pair=pair, with_cheapest=with_cheapest, only=only)


def _estimates(configs: dict[str, Any], dtypes: dict[str, str], workload: Workload,
               quantization: dict[str, str | None] | None = None) -> tuple[ModelEstimate, ...] | None:
    """Both models (base, SFT) from their configs, NF4 where ``quantization`` says so; None when the
    planner does not model their family."""
    quantization = quantization or {}
    try:
        return tuple(
            estimate_model(role, architecture_from_config(configs[role]), checkpoint_of(configs[role]), dtypes[role],
                           quantization.get(role) or dtypes[role], workload)
            for role in ("base", "sft"))
    except UnsupportedArchitectureError:
        return None


def lens_time_estimate(configs: dict[str, Any], dtypes: dict[str, str], machine: Machine, *, tokens: int,
                       prompts: int, forward_batch: int, layers: int) -> dict[str, float] | None:
    """The seconds ``auto`` weighs (``lens_compare.analyses.lens_choice``): both models' forward passes
    over every prompt, and the logit lens at all ``layers`` captured layers and at the output alone,
    on ``machine``. None when the planner does not model these models' family."""
    workload = Workload(tokens=max(tokens, 1), batch=max(prompts, 1), forward_batch=max(forward_batch, 1),
                        base_dtype=dtypes["base"], sft_dtype=dtypes["sft"])
    models = _estimates(configs, dtypes, workload)
    if models is None:
        return None
    return {"forwards": sum(forward_seconds(m, None, machine, workload) for m in models),
            "lens_all": lens_seconds(models, machine, workload, layers),
            "lens_final": lens_seconds(models, machine, workload, 1)}


def steering_time_estimate(configs: dict[str, Any], dtypes: dict[str, str], machine: Machine, *, tokens: int,
                           prompts: int, forward_batch: int, lens_layers: int, schedule: str,
                           layers: tuple[int, ...], alphas: int, held_out_prompts: int = 0,
                           quantization: dict[str, str | None] | None = None) -> dict[str, float] | None:
    """The seconds the steering check's ``auto`` weighs (``lens_compare.hardware.steering``) on
    ``machine``: the check's (``timing.steering_seconds``: steered at ``layers`` by ``alphas`` multiples,
    on ``schedule``) and the core run's on that schedule (``stream_seconds``, else ``run_seconds``), its
    logit lens at ``lens_layers`` layers included. ``quantization`` names the sides loaded as NF4. None
    when the planner does not model these models' family.

    >>> steering_time_estimate(configs, dtypes, cpu, tokens=250, prompts=16, forward_batch=8, lens_layers=1,
    ...                        schedule="resident", layers=(0, 7, 14, 22, 29), alphas=3)  # doctest: +SKIP
    {'steering': 231.1, 'run': 32.5}
    """
    workload = Workload(tokens=max(tokens, 1), batch=max(prompts, 1), forward_batch=max(forward_batch, 1),
                        base_dtype=dtypes["base"], sft_dtype=dtypes["sft"], lens_layers=lens_layers)
    models = _estimates(configs, dtypes, workload, quantization)
    if models is None:
        return None
    run = stream_seconds(models, machine, workload) if schedule == "stream" else \
        run_seconds(models, None, machine, workload)
    return {"steering": steering_seconds(models, None, machine, workload, schedule=schedule, layers=layers,
                                         alphas=alphas, held_out_prompts=held_out_prompts),
            "run": run}


def plan_for_machine(
    pair: str | None = None,
    *,
    base: str | None = None,
    sft: str | None = None,
    base_config: Any = None,
    sft_config: Any = None,
    tokens: int,
    batch: int = 1,
    forward_batch: int | None = None,
    base_dtype: str = "bfloat16",
    sft_dtype: str = "bfloat16",
    states: int | None = None,
    machine: Machine | None = None,
    strategy: str | None = None,
) -> Plan:
    """The plan for this machine (detected unless given); raises HardwareError if nothing fits.

    This is the check ``lens_compare.run`` makes before it loads any weights.
    """
    machine = machine or detect_machine()
    workload = Workload(tokens=tokens, batch=batch, base_dtype=base_dtype, sft_dtype=sft_dtype,
                        states=states, forward_batch=forward_batch)
    b, s = sources_for(pair, base, sft, base_config, sft_config)
    plan = plan_models(b, s, workload, machine, strategy=strategy, pair=pair, with_cheapest=False)
    if plan.strategy is None:
        raise HardwareError(
            f"refusing to load: nothing fits on {machine.label}.\n{plan.explain()}"
        )
    return plan


__all__ = ["AUTO_ORDER", "MAX_GPUS_PER_MACHINE", "NF4_CAVEAT", "STREAM_NOTE", "Plan", "plan_for_machine",
           "plan_models", "plan_pair", "sources_for"]
