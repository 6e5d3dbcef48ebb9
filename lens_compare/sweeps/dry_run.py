"""``--dry-run``: every run of a sweep planned before anything loads, for the machine given.

One row per pair and token length: the strategy the planner picks, the GPUs it needs, its peak
memory per GPU, minutes and dollars; or, where nothing fits or the planner cannot model the
pair, the one-line reason. This is the seed's hardware table turned into a plan of work. The
minutes and dollars include the steering check where a run would do it (``--steer``, or auto:
where it takes at most the run's own time; ``lens_compare.hardware.steering``).

>>> from lens_compare.hardware.machine import catalog_machine
>>> plan = plan_sweep(["qwen7b"], [10, 250], n_prompts=16, machine=catalog_machine("h100", 8))
>>> [(row.tokens, row.strategy, row.gpus) for row in plan.rows]
[(10, 'resident', 1), (250, 'resident', 1)]
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lens_compare.config import RunConfig
from lens_compare.errors import ConfigError, LensCompareError
from lens_compare.hardware.machine import Machine
from lens_compare.hardware.planner import Plan, plan_models, plan_pair
from lens_compare.hardware.precision import check_precision
from lens_compare.hardware.run_memory import Workload
from lens_compare.hardware.sources import pair_sources
from lens_compare.hardware.steering import planned_steering
from lens_compare.hardware.timing import run_cost
from lens_compare.models.pairs import PairSpec, builtin_pairs, get_pair
from lens_compare.util.choices import DTYPES, STRATEGIES


@dataclass(frozen=True)
class PlannedRun:
    """One run of the sweep as planned: ``strategy`` None means refused, and ``reason`` says why."""

    pair: str
    tokens: int
    strategy: str | None
    gpus: int | None = None
    peak_gib_per_gpu: float | None = None
    est_seconds: float | None = None
    # The GPUs it runs on x their hourly price x seconds; None where the machine has no price (the CPU).
    est_cost_usd: float | None = None
    reason: str | None = None
    # The steering check's share of ``est_seconds`` (0: off for this run).
    steering_seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.strategy is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepTotals:
    """What the planned sweep adds up to. ``seconds`` and ``cost_usd`` count every run that fits as a
    run of its own; the ``*_with_prefixes`` figures count, per pair, only its longest length that fits,
    since a causal model's states at positions < N do not depend on later tokens and the shorter
    lengths are read from that one capture. ``cost_usd`` sums the runs that have a price (None: none
    has, as on the CPU)."""

    runs: int
    runs_fit: int
    runs_refused: int
    seconds: float
    seconds_with_prefixes: float
    cost_usd: float | None
    cost_usd_with_prefixes: float | None
    # With the prefix rule and the runs side by side on the machine's GPUs (``--executor ray``), the
    # machine's wall time is at least this: the GPU-seconds over the GPU count, or the longest run.
    seconds_side_by_side_at_least: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SweepPlan:
    """Every run of a sweep on one machine, in the order they were asked for (pairs, then lengths)."""

    machine: Machine
    n_prompts: int
    rows: tuple[PlannedRun, ...]

    def totals(self) -> SweepTotals:
        fitting = [row for row in self.rows if row.fits]
        longest: dict[str, PlannedRun] = {}
        for row in fitting:
            if row.pair not in longest or row.tokens > longest[row.pair].tokens:
                longest[row.pair] = row
        return SweepTotals(
            runs=len(self.rows),
            runs_fit=len(fitting),
            runs_refused=len(self.rows) - len(fitting),
            seconds=sum(row.est_seconds or 0.0 for row in fitting),
            seconds_with_prefixes=sum(row.est_seconds or 0.0 for row in longest.values()),
            cost_usd=_priced_sum(fitting),
            cost_usd_with_prefixes=_priced_sum(list(longest.values())),
            seconds_side_by_side_at_least=max(
                [sum((row.gpus or 1) * (row.est_seconds or 0.0) for row in longest.values()) / self.machine.count,
                 *(row.est_seconds or 0.0 for row in longest.values())], default=0.0),
        )

    def table(self) -> str:
        """Markdown: one line per run (pair, tokens, strategy, GPUs, peak GiB, minutes, $), then the totals."""
        lines = ["| pair | tokens | strategy | GPUs | peak GiB | minutes | $ |",
                 "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
        for row in self.rows:
            if row.fits:
                cells = [row.strategy, str(row.gpus), f"{row.peak_gib_per_gpu:.2f}", _minutes(row.est_seconds),
                         _dollars(row.est_cost_usd)]
            else:
                cells = [f"refused: {row.reason}", "-", "-", "-", "-"]
            lines.append(f"| {row.pair} | {row.tokens} | " + " | ".join(cells) + " |")
        t = self.totals()
        steered = [row for row in self.rows if row.steering_seconds]
        lines.append("")
        if steered:
            lines.append(f"minutes and $ include the steering check in {len(steered)} of {t.runs_fit} run(s), "
                         f"{_minutes(sum(row.steering_seconds for row in steered))} min in all (auto: where it "
                         "takes at most the run's own time, never streamed; --no-steer leaves it out)")
        lines.append(
            f"{t.runs} run{'s' if t.runs != 1 else ''} on {self.machine.label}, {self.n_prompts} prompt(s) each: "
            f"{t.runs_fit} fit, {t.runs_refused} refused; {_minutes(t.seconds)} min, {_dollars(t.cost_usd)} "
            f"({_minutes(t.seconds_with_prefixes)} min, {_dollars(t.cost_usd_with_prefixes)} with each pair's "
            "shorter lengths read from its longest capture"
            + (f"; side by side on the {self.machine.count} GPUs, --executor ray: at least "
               f"{_minutes(t.seconds_side_by_side_at_least)} min of the machine)" if self.machine.count > 1 else ")")
        )
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "lens_compare.sweep_plan/1",
            "machine": self.machine.to_dict(),
            "n_prompts": self.n_prompts,
            "rows": [row.to_dict() for row in self.rows],
            "totals": self.totals().to_dict(),
        }


def _priced_sum(rows: list[PlannedRun]) -> float | None:
    priced = [row.est_cost_usd for row in rows if row.est_cost_usd is not None]
    return sum(priced) if priced else None


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f}"


def _dollars(cost: float | None) -> str:
    return "no price" if cost is None else f"${cost:.2f}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _refusal(plan: Plan) -> str:
    """Why nothing fits, in one line: each strategy the planner weighed with its reason."""
    weighed = (plan.requested,) if plan.requested else tuple(plan.strategies)
    reasons = []
    for name in weighed:
        result = plan.strategies[name]
        if result.fits:  # nf4 alone: auto never picks it, since 4-bit weights change the numbers
            reasons.append(f"{name} fits but changes the numbers (ask for it with --strategy {name})")
        else:
            reasons.append(f"{name}: {result.reason or 'does not fit'}")
    return f"nothing fits on {plan.machine.label}: " + "; ".join(reasons)


def _planned(spec: PairSpec, plan: Plan, steer: bool | None, steer_layers: tuple[int, ...],
             steer_alphas: tuple[float, ...]) -> PlannedRun:
    """A row for a plan that fits, the steering check counted where it would run."""
    run = plan.chosen
    steering = planned_steering(plan, steer, steer_layers, steer_alphas).added_seconds
    seconds = run.est_seconds + steering if run.est_seconds is not None else None
    cost = run_cost(seconds, plan.machine) if seconds is not None else None
    return PlannedRun(spec.key, plan.workload.tokens, run.name, run.min_gpus, run.peak_gib_per_gpu, seconds, cost,
                      steering_seconds=steering)


def _plan_run(spec: PairSpec, tokens: int, n_prompts: int, machine: Machine, dtype: str | None,
              strategy: str | None) -> Plan:
    if builtin_pairs().get(spec.key) is spec:
        return plan_pair(spec.key, tokens=tokens, batch=n_prompts, dtype=dtype, strategy=strategy,
                         machine=machine, with_cheapest=False)
    # A --pairs-file pair: the planner's registry lookup does not see it, so plan its sources the way
    # plan_pair plans a registered pair (its own dtypes per side, else --dtype, else bfloat16).
    default = dtype if dtype in DTYPES else "bfloat16"
    workload = Workload(tokens=tokens, batch=n_prompts, base_dtype=spec.base_dtype or default,
                        sft_dtype=spec.sft_dtype or default)
    precision = dtype if dtype in (*DTYPES, "fp8") else None
    return plan_models(*pair_sources(spec), workload, machine, precision=precision, strategy=strategy,
                       pair=spec.key, with_cheapest=False)


def _check(lengths: Sequence[int], n_prompts: int, dtype: str | None, strategy: str | None) -> tuple[int, ...]:
    """The lengths, each once; every bad option refused here, so that no run is refused for it."""
    if strategy not in (None, "auto", *STRATEGIES):
        raise ConfigError(f"unknown strategy {strategy!r}; expected auto or one of {', '.join(STRATEGIES)}")
    if dtype is not None and check_precision(dtype) == "nf4":
        raise ConfigError("--dtype nf4 is a strategy, not a precision: use --strategy nf4")
    bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad or not lengths:
        raise ConfigError(
            f"token lengths {list(lengths)!r} are impossible; expected one or more whole numbers >= 1 "
            "(e.g. --tokens 10,50,100,250)"
        )
    if isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 1:
        raise ConfigError(f"{n_prompts!r} prompts per run is impossible; expected a whole number >= 1")
    return tuple(dict.fromkeys(lengths))


def plan_sweep(
    pairs: Sequence[str],
    lengths: Sequence[int],
    *,
    n_prompts: int,
    machine: Machine,
    dtype: str | None = None,
    strategy: str | None = None,
    extra: dict[str, PairSpec] | None = None,
    steer: bool | None = None,
    steer_layers: tuple[int, ...] = (),
    steer_alphas: tuple[float, ...] = RunConfig().steer_alphas,
) -> SweepPlan:
    """Plan every pair at every length on ``machine`` (``strategy`` None or ``auto``: the planner's pick),
    each with the steering check as ``steer`` asks (None: auto) at ``steer_layers`` by ``steer_alphas``.

    ``pairs`` are keys as ``expand_pairs`` returns them (``extra``: the pairs of ``--pairs-file``).
    Unknown keys and impossible lengths are refused at once; a pair the planner cannot model
    (an unsupported architecture, a config it cannot read) becomes a refused row with its reason,
    and the other pairs are still planned.
    """
    lengths = _check(lengths, n_prompts, dtype, strategy)
    specs = [get_pair(key, extra) for key in pairs]
    chosen_strategy = None if strategy == "auto" else strategy
    rows = []
    for spec in specs:
        for tokens in lengths:
            try:
                plan = _plan_run(spec, tokens, n_prompts, machine, dtype, chosen_strategy)
            except LensCompareError as error:
                rows.append(PlannedRun(spec.key, tokens, None, reason=_one_line(str(error))))
                continue
            run = plan.chosen
            if run is not None and machine.kind == "cuda" and run.min_gpus and run.min_gpus < machine.count:
                # As a run does (the preflight): on no more GPUs than it needs, so that the others
                # take other runs side by side (--executor ray); its peak and cost are those GPUs'.
                narrow = _plan_run(spec, tokens, n_prompts, machine.with_count(run.min_gpus), dtype, run.name)
                plan = narrow if narrow.chosen is not None else plan
            if run is None:
                rows.append(PlannedRun(spec.key, tokens, None, reason=_refusal(plan)))
            else:
                rows.append(_planned(spec, plan, steer, steer_layers, steer_alphas))
    return SweepPlan(machine, n_prompts, tuple(rows))
