"""Whether a run does the steering check (``lens_compare.analyses.steering``): the ``steer`` option,
resolved once the planner has chosen how the run executes, before any weight is read
(``lens_compare.pipeline.steps.choose_steering``), and the same choice for a run the dry runs plan.

The option (``--steer`` / ``--no-steer``, ``compare(steer=...)``, ``steer:`` in a config):

- unset (the default, auto): on where the hardware planner estimates that the check takes at most as
  long as the core run itself, on the run's device and strategy
  (``lens_compare.hardware.planner.steering_time_estimate``); off otherwise, and off where it cannot
  run: without the difference lens (its ``rest`` class), or for models whose family the planner does
  not model (no estimate); off on the ``stream`` strategy, whose memory plan (the states each shard
  keeps for the check) is made before the check is chosen;
- ``True`` (``--steer``, or held-out prompts given with ``--steer-prompts``): on, and refused before
  loading where it cannot run;
- ``False`` (``--no-steer``): off.

The check is forwards of the base model, one per steered layer and α, besides one of each model, each
read through its head. Where loading dominates a run (small models, fast GPUs) that is cheap beside
it; SmolLM2-135M on a 2-core CPU at 250 tokens x 16 prompts, steered at 5 layers by 3 multiples,
would take ~231 s against the core run's ~33 s, so auto leaves it off there.

>>> decide(None, (0, 2), (0.5, 1.0, 2.0), {"steering": 0.4, "run": 3.1}).on
True
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lens_compare.hardware.timing import steering_seconds
from lens_compare.util.layers import spread_layers

if TYPE_CHECKING:
    from lens_compare.hardware.planner import Plan

STREAM = ("stream: auto leaves it off on the stream strategy, whose memory plan is made before the check is "
          "chosen; --steer runs it")


@dataclass(frozen=True)
class SteeringChoice:
    """What the steering check does in a run: steer at ``layers`` (empty when off) by each of ``alphas``
    times that layer's mean shift over the ``rest`` tokens; ``requested`` the option as given (None:
    auto); ``reason`` one line on why it is on or off; ``estimate`` the planner's seconds for the check
    (``steering``) and for the core run (``run``) where it weighed them."""

    requested: bool | None
    reason: str
    layers: tuple[int, ...] = ()
    alphas: tuple[float, ...] = ()
    estimate: dict[str, float] | None = None
    # Held-out prompts (``--steer-prompts``) the check is also measured on; 0 for none.
    held_out_prompts: int = 0

    @property
    def on(self) -> bool:
        return bool(self.layers)

    @property
    def added_seconds(self) -> float:
        """The planner's seconds for the check where it is on (0 where it is off)."""
        return self.estimate["steering"] if self.on and self.estimate is not None else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON's ``provenance.steering``."""
        return {"requested": self.requested, "on": self.on, "reason": self.reason, "layers": list(self.layers),
                "alphas": list(self.alphas), "positions": "rest" if self.on else None,
                "held_out_prompts": self.held_out_prompts, "estimate": self.estimate}


def decide(requested: bool | None, layers: tuple[int, ...], alphas: tuple[float, ...],
           estimate: dict[str, float] | None) -> SteeringChoice:
    """On or off where the check can run: as asked, else (auto) on where the planner's ``estimate``
    says the check takes at most the core run's time."""
    if requested:
        seconds = "" if estimate is None else \
            f"; ~{_seconds(estimate['steering'])} beside the core run's ~{_seconds(estimate['run'])}"
        return SteeringChoice(True, f"asked for{seconds}", layers, alphas, estimate)
    if estimate is None:
        return SteeringChoice(None, "no time estimate for these models; --steer runs it")
    steering, run = estimate["steering"], estimate["run"]
    if steering <= run:
        return SteeringChoice(None, f"the check takes ~{_seconds(steering)}, at most the core run's ~{_seconds(run)}",
                              layers, alphas, estimate)
    return SteeringChoice(None, f"the check would take ~{_seconds(steering)}, {steering / max(run, 1e-12):.1f}x the "
                                f"core run's ~{_seconds(run)}; --steer runs it", estimate=estimate)


def _seconds(value: float) -> str:
    """Seconds to one decimal, or to two significant digits below one tenth.

    >>> _seconds(231.07), _seconds(0.0123)
    ('231.1 s', '0.012 s')
    """
    return f"{value:.1f} s" if value >= 0.1 else f"{value:.2g} s"


def planned_steering(plan: "Plan", requested: bool | None, steer_layers: tuple[int, ...],
                     alphas: tuple[float, ...]) -> SteeringChoice:
    """The steering check of a run as planned without its prompts (the dry runs: ``lens_compare.plan``,
    the sweep's ``--dry-run``): as a run decides, against the plan's own figure for the
    run, with the difference lens taken to read every layer (it does wherever the logit lens runs).

    >>> planned_steering(plan_pair("qwen7b", tokens=250, batch=16), None, (), (0.5, 1.0, 2.0)).on  # doctest: +SKIP
    True
    """
    chosen = plan.chosen
    if requested is False:
        return SteeringChoice(False, "--no-steer")
    if chosen is None or chosen.est_seconds is None:
        return SteeringChoice(requested, "no run planned" if chosen is None else "no time estimate for this machine")
    if chosen.name == "stream" and not requested:
        return SteeringChoice(requested, STREAM)
    layers = tuple(sorted(set(steer_layers))) or spread_layers(tuple(range(plan.base.arch.n_layers)))
    schedule = "stream" if chosen.name == "stream" else "resident" if chosen.layout == "resident" else "sequential"
    seconds = steering_seconds((plan.base, plan.sft), "nf4" if chosen.name == "nf4" else None, plan.machine,
                               plan.workload, schedule=schedule, layers=layers, alphas=len(alphas))
    return decide(requested, layers, alphas, {"steering": seconds, "run": chosen.est_seconds})


def describe(choice: SteeringChoice) -> str:
    """One line for the run's log.

    >>> describe(SteeringChoice(None, "the check takes ~0.4 s, at most the core run's ~3.1 s", (0, 2), (1.0,)))
    "steering check on at layers 0, 2 x 1 alpha(s) (auto: the check takes ~0.4 s, at most the core run's ~3.1 s)"
    """
    how = "--steer" if choice.requested else "--no-steer" if choice.requested is False else "auto"
    if not choice.on:
        return f"steering check off ({how}: {choice.reason})" if how == "auto" else f"steering check off ({how})"
    return (f"steering check on at layers {', '.join(map(str, choice.layers))} x {len(choice.alphas)} alpha(s) "
            f"({how}: {choice.reason})")

