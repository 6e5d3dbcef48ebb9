"""How a run will execute, decided before any weights load: schedule and per-model load options.

The decision reads a run's ``PlanFacts`` (``lens_compare.pipeline.prepare.PreparedRun.plan_facts``)
and returns an ``Execution``. ``lens_compare.pipeline.preflight.memory_preflight`` decides from the
hardware planner's choice; ``default_execution`` without a planner (``check_memory=False``).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lens_compare.models.load_options import LoadOptions
from lens_compare.models.refs import Side
from lens_compare.util.units import LOGIT_LENS_CHUNK_BYTES

if TYPE_CHECKING:
    from transformers import PretrainedConfig

SCHEDULES = ("resident", "sequential", "stream")


@dataclass(frozen=True)
class PlanFacts:
    """What the preflight knows of a run before any weights load: all it plans the run from."""

    # The pair's registry key, or "custom".
    pair: str
    # Each model as it will be loaded: reference, dtype, a quantization the pair fixes.
    base: Side
    sft: Side
    # Each role's model config ("base", "sft").
    configs: "dict[str, PretrainedConfig]"
    # The resolved device: "cpu", "cuda" or "cuda:N".
    device: str
    # The CUDA indices the run may use; () on the CPU.
    gpus: tuple[int, ...]
    # The layers whose residual states are captured.
    layers: tuple[int, ...]
    # How many prompts the run compares.
    n_prompts: int
    # The longest prompt, in tokens.
    max_tokens: int
    # Prompts per forward pass.
    batch_size: int
    # The requested strategy; "auto" lets the planner choose.
    strategy: str
    # Extra from_pretrained keywords for both models (the local_run guard's), or None.
    model_kwargs: dict[str, Any] | None = None
    # Each block's attention and MLP outputs are compared too.
    components: bool = False
    # The logit lens runs.
    logit_lens: bool = False
    # How many layers the logit lens reads.
    lens_layers: int = 0
    # The lens's mode (lens_compare.analyses.lens_choice): "final" reads the last layer only.
    lens_mode: str = "off"
    # Tokens CKA's Gram matrices cover; 0 without CKA.
    cka_tokens: int = 0
    # The noise floor runs the SFT model once more in a second precision.
    noise_floor: bool = False
    # Prompts whose states are held at once (a run folder holds one shard's); None: every prompt.
    held_prompts: int | None = None
    # States per model a streamed run keeps for the logit lens beyond the two it streams with.
    lens_kept_states: int = 0
    # Bytes of the lens's working tensors per chunk of tokens.
    lens_chunk_bytes: int = LOGIT_LENS_CHUNK_BYTES


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


def side_loads(facts: PlanFacts, strategy: str, device: str) -> dict[str, LoadOptions]:
    """Each side on ``device``, NF4 where the strategy or the pair asks for it."""
    overrides = facts.model_kwargs or {}
    loads = {}
    for side in (facts.base, facts.sft):
        quantization = side.quantization or ("nf4" if strategy == "nf4" else None)
        loads[side.role] = LoadOptions(side.dtype, device, quantization=quantization, model_kwargs=dict(overrides))
    return loads


def default_execution(facts: PlanFacts) -> Execution:
    """No planner: the configured strategy (``auto`` -> sequential) on the configured device."""
    strategy = "sequential" if facts.strategy == "auto" else facts.strategy
    schedule = "sequential" if strategy == "nf4" else strategy
    device = f"cuda:{facts.gpus[0]}" if facts.gpus else facts.device
    loads = side_loads(facts, strategy, device)
    if any(options.quantization for options in loads.values()):
        from lens_compare.models.quantization import require_bitsandbytes

        require_bitsandbytes()
    return Execution(strategy, schedule, loads)
