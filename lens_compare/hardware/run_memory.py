"""Memory a comparison run needs on top of the weights, term by term, per model.

Terms (bytes; B = prompts, b = prompts per forward pass (``forward_batch``, at most B),
T = tokens, S = residual states captured, at most L+1):
- ``residuals``: S x B x T x d_model x activation bytes, held until both models ran.
- ``metrics_upcast``: the metrics run one residual state at a time: float32 copies of
  both models' state plus their difference (3 x B x T x d_model x 4), and the float32
  per-token metric tensors (10 metrics x S x B x T x 4 per state, twice that again for
  the two hook views); split evenly between the two models.
- ``logits``: b x T x vocab in the activation dtype plus its float32 upcast.
- ``attention_scores``: eager attention's b x heads x T^2 scores, float32 softmax and
  cast back, for one layer at a time.
- ``activations``: one block's working set (q/k/v, 4 x d_model, 3 x MLP width).
- ``load_transient``: GGUF checkpoints are dequantized to float32 tensor by tensor
  before they are cast: the memory-mapped file plus ``GGUF_DEQUANT_FACTOR`` x the
  float32 parameter bytes, a factor fitted on one measurement (smollm2-sanity, CPU,
  peak RSS increase; benchmarks/bench_planner_memory.py) and checked on smollm2-dtype.
  Safetensors load shard by shard: 0 (not measured).
- ``context``: CUDA context and cuBLAS workspace per GPU, 0.5 GiB (the usual
  nvidia-smi figure; not measured here). 0 on the CPU, where the Python/torch baseline
  is excluded by measuring the increase.
Peak memory is then the largest of the run's phases (see ``strategies.py``), plus an
allocator margin of ``MARGIN`` of the total.
"""

from dataclasses import asdict, dataclass
from typing import Any

from lens_compare.errors import ConfigError
from lens_compare.hardware.architecture import Architecture
from lens_compare.hardware.units import DTYPE_BYTES, gib

CUDA_CONTEXT_GIB = 0.5
MARGIN = 0.05
GGUF_DEQUANT_FACTOR = 0.3


@dataclass(frozen=True)
class Workload:
    tokens: int
    batch: int = 1
    base_dtype: str = "bfloat16"
    sft_dtype: str = "bfloat16"
    # Residual states captured per model; None means all L+1.
    states: int | None = None
    # Prompts per forward pass (the run's batch_size); None means all ``batch`` at once.
    forward_batch: int | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("tokens", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} (expected a whole number >= 1)")
        for name in ("base_dtype", "sft_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                problems.append(f"{name}={getattr(self, name)!r} (expected one of {', '.join(DTYPE_BYTES)})")
        for name in ("states", "forward_batch"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r} (expected a whole number >= 1 or None)")
        if problems:
            raise ConfigError("invalid workload: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelRunTerms:
    """One model's run terms, in GiB."""

    residuals: float
    metrics_upcast: float
    logits: float
    attention_scores: float
    activations: float
    load_transient: float

    @property
    def forward_transient(self) -> float:
        # Logits appear after the last block, when its attention/MLP buffers are freed.
        return max(self.logits, self.attention_scores + self.activations)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def model_run_terms(
    arch: Architecture,
    dtype: str,
    workload: Workload,
    *,
    params: int,
    gguf_file_bytes: int = 0,
) -> ModelRunTerms:
    act = DTYPE_BYTES[dtype]
    bt = workload.batch * workload.tokens
    forward_batch = min(workload.forward_batch or workload.batch, workload.batch)
    forward_bt = forward_batch * workload.tokens
    states = min(workload.states or arch.n_layers + 1, arch.n_layers + 1)
    residual_bytes = states * bt * arch.d_model * act
    width = arch.d_mlp
    if arch.rule.moe:
        width = max(width, arch.d_moe * (arch.n_shared_experts + arch.experts_per_token))
    heads_dim = (arch.n_heads + 2 * arch.n_kv_heads) * arch.head_dim
    load = 0.0
    if gguf_file_bytes:
        load = GGUF_DEQUANT_FACTOR * params * 4 + gguf_file_bytes
    return ModelRunTerms(
        residuals=gib(residual_bytes),
        metrics_upcast=gib((3 * bt * arch.d_model * 4 + 30 * states * bt * 4) / 2),
        logits=gib(forward_bt * arch.vocab_size * (act + 4)),
        attention_scores=gib(forward_batch * arch.n_heads * workload.tokens**2 * (2 * act + 4)),
        activations=gib(forward_bt * (4 * arch.d_model + 3 * width + heads_dim) * act),
        load_transient=gib(load),
    )


def skip_savings_gib(terms: ModelRunTerms, arch: Architecture, skipped: int) -> float:
    """Capture memory saved by not capturing the first ``skipped`` states of one model."""
    if skipped < 0 or skipped > arch.n_layers:
        raise ConfigError(f"cannot skip {skipped} of {arch.n_layers + 1} residual states")
    per_state = (terms.residuals + terms.metrics_upcast) / (arch.n_layers + 1)
    return per_state * skipped
