"""How a run will execute, decided before any weights load: schedule and per-model load options.

``lens_compare.preflight.memory_preflight`` builds it from the hardware planner's
choice; ``default_execution`` builds it without a planner (``check_memory=False``).
"""

from dataclasses import dataclass
from typing import Any

from lens_compare.hardware.units import LOGIT_LENS_CHUNK_BYTES
from lens_compare.load_options import LoadOptions

SCHEDULES = ("resident", "sequential", "stream")


@dataclass(frozen=True)
class Execution:
    """``strategy`` is what was chosen (``resident``, ``sequential``, ``nf4`` or ``stream``);
    ``schedule`` is the engine that runs it (NF4 runs ``resident`` when both models fit, else
    ``sequential``; ``stream`` runs ``stream``); ``loads`` says how each model is loaded (device or split, dtype,
    quantization); ``estimate`` is the planner's figure for the run, when it made one."""

    strategy: str
    schedule: str
    loads: dict[str, LoadOptions]
    estimate: dict[str, Any] | None = None
    # Bytes the logit lens's working tensors may take per chunk of tokens (the preflight sizes it
    # from the memory its plan leaves free).
    lens_chunk_bytes: int = LOGIT_LENS_CHUNK_BYTES

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")


def side_loads(facts: dict[str, Any], strategy: str, device: str) -> dict[str, LoadOptions]:
    """Each side on ``device``, NF4 where the strategy or the pair asks for it."""
    overrides = facts.get("model_kwargs") or {}
    loads = {}
    for side in (facts["base"], facts["sft"]):
        quantization = side.quantization or ("nf4" if strategy == "nf4" else None)
        loads[side.role] = LoadOptions(side.dtype, device, quantization=quantization, model_kwargs=dict(overrides))
    return loads


def default_execution(facts: dict[str, Any]) -> Execution:
    """No planner: the configured strategy (``auto`` -> sequential) on the configured device."""
    strategy = "sequential" if facts["strategy"] == "auto" else facts["strategy"]
    schedule = "sequential" if strategy == "nf4" else strategy
    device = f"cuda:{facts['gpus'][0]}" if facts["gpus"] else facts["device"]
    loads = side_loads(facts, strategy, device)
    if any(options.quantization for options in loads.values()):
        from lens_compare.quantization import require_bitsandbytes

        require_bitsandbytes()
    return Execution(strategy, schedule, loads)
