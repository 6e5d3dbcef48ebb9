"""Memory a comparison run needs on top of the weights, term by term, per model.

Terms (bytes; B = prompts, b = prompts per forward pass (``forward_batch``, at most B),
T = tokens, S = residual states captured, at most L+1, C = sublayer outputs captured, two
per compared block (``components``)):
- ``residuals``: (S + C) x B x T x d_model x activation bytes, held until both models ran.
- ``metrics_upcast``: the metrics run one residual state at a time: float32 copies of
  both models' state plus their difference (3 x B x T x d_model x 4), and the float32
  per-token metric tensors (10 metrics x S x B x T x 4 per state, twice that again for
  the two hook views); split evenly between the two models.
- ``logit_lens`` (with the lens): half of the lens's chunk of ``[tokens, vocab]`` working
  tensors (``Workload.lens_chunk_bytes``: the preflight sizes it from what the plan leaves free,
  ``LOGIT_LENS_CHUNK_BYTES`` to plan with), each model's share, in a phase after both forwards;
  ``head``: the unembedding (vocab x d_model), which a sequential run keeps for the first model
  and a streamed run reads before its first block.
- ``logits``: b x vocab in the activation dtype plus its float32 upcast: the capture
  asks for the last position's logits only (``logits_to_keep=1``).
- ``attention_scores``: eager attention's b x heads x T^2 scores, float32 softmax and
  cast back, for one layer at a time.
- ``activations``: one block's working set (q/k/v, 4 x d_model, 3 x MLP width).
- ``load_transient`` (host memory while loading, on top of the weights): a GGUF is
  dequantized once, into lens_compare's cache (``lens_compare.models.gguf``): the whole model in
  float32, tensor by tensor, which exceeds the weights in a 16-bit dtype by 2 bytes per
  parameter, plus the memory-mapped file and ``GGUF_DEQUANT_FACTOR`` x the float32
  parameter bytes, a factor fitted on one measurement (smollm2-sanity, CPU, peak RSS
  increase; benchmarks/bench_planner_memory.py) and checked on smollm2-dtype. Once cached,
  and for any safetensors checkpoint, the weights are memory-mapped: 0 when the checkpoint
  holds the run's dtype; in another dtype (a cached GGUF read as bfloat16, a bfloat16
  checkpoint run in float32) the mapped source's pages are read while they are cast and count
  until the load ends: ``CAST_SOURCE_RESIDENT`` of the checkpoint's bytes, fitted on one
  measurement (on a GPU machine, in host memory). (Converted to another dtype, or quantized, the source's pages stay
  mapped until the load ends and show in RSS while RAM is free; they are clean page
  cache the kernel reclaims under pressure, so they never decide whether a run fits.)
- ``nf4_load_transient``: the same while loading NF4 weights on the CPU. A cached NF4
  checkpoint is read straight into the model's tensors: 0. From a GGUF not yet dequantized
  into the cache, the float32 model exists while it is written there: the GGUF transient
  plus the float32 parameters.
- ``bridge_host``: host memory of the TransformerBridge wrapping one model (its hook
  points and component wrappers), ``BRIDGE_HOST_GIB_PER_BLOCK`` per block; with
  ``RUN_SETUP_HOST_GIB`` for the run's tokenizers and prepared prompts, counted on the
  CPU, where host and device are one memory.
- ``context``: CUDA context and cuBLAS workspace per GPU, 0.5 GiB (the usual
  nvidia-smi figure; not measured here). 0 on the CPU, where the Python/torch baseline
  is excluded by measuring the increase.
Peak memory is then the largest of the run's phases (see ``strategies.py``), plus an
allocator margin of ``MARGIN`` of the total.
"""

from dataclasses import asdict, dataclass
from typing import Any

from lens_compare.errors import ConfigError
from lens_compare.models.architecture import Architecture
from lens_compare.util.choices import DTYPE_BYTES
from lens_compare.util.units import LOGIT_LENS_CHUNK_BYTES, gib, lens_working_bytes

CUDA_CONTEXT_GIB = 0.5
MARGIN = 0.05
# Host memory of the run itself, measured on the SmolLM2 pair on the CPU (peak RSS by
# phase): tokenizers, configs and the prepared run before any weight (60 MB), and the
# hook points and wrappers TransformerBridge builds around each block (~35 MB per
# 30-block model).
RUN_SETUP_HOST_GIB = 0.055
BRIDGE_HOST_GIB_PER_BLOCK = 0.0012
GGUF_DEQUANT_FACTOR = 0.18
# The share of a memory-mapped checkpoint's pages resident at the peak of a load that casts it to
# another dtype: fitted on SmolLM2's float32 copy loaded as bfloat16 (0.5 GiB mapped, peak RSS
# +0.37 GiB over the loaded weights; benchmarks/bench_planner_memory.py, smollm2-dtype).
CAST_SOURCE_RESIDENT = 0.75


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
    # Prompts in the whole run, when more than ``batch`` are held at once (shards): the
    # time estimate runs them all. None means ``batch``.
    prompts: int | None = None
    # Sublayer outputs (attention and MLP writes, two per compared block) captured per model
    # beside the residual states, by the TransformerBridge strategies.
    components: int = 0
    # The logit lens runs (lens_compare.analyses.logit_lens): its chunked float32 working
    # tensors after the forward passes; a sequential run keeps the first model's head.
    logit_lens: bool = False
    # Layers the lens reads (its time; 0 with the lens off), and the bytes of its chunk's working
    # tensors (its memory; sized from what the plan leaves free).
    lens_layers: int = 0
    lens_chunk_bytes: int = LOGIT_LENS_CHUNK_BYTES
    # The lens reads the last layer only (the default): a chunk keeps nothing but its logits.
    lens_final_only: bool = False
    # Residual states per model a streamed run keeps in host memory until its shard's last block,
    # beyond the two it streams with (the logit lens's layers, compared with the final one).
    kept_states: int = 0
    # The dtype the noise floor runs the SFT model in again, after the run (``--noise-floor``).
    noise_floor: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("tokens", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name}={value!r} (expected a whole number >= 1)")
        for name in ("base_dtype", "sft_dtype"):
            if getattr(self, name) not in DTYPE_BYTES:
                problems.append(f"{name}={getattr(self, name)!r} (expected one of {', '.join(DTYPE_BYTES)})")
        for name in ("states", "forward_batch", "prompts"):
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
    nf4_load_transient: float = 0.0
    bridge_host: float = 0.0
    # The logit lens's share of its chunk working tensors, and this model's final norm and
    # unembedding (kept past the model's release in a sequential run).
    logit_lens: float = 0.0
    head: float = 0.0

    @property
    def forward_transient(self) -> float:
        # Logits appear after the last block, when its attention/MLP buffers are freed. The logit
        # lens runs after both forwards: a phase of its own (strategies.py).
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
    nf4_cached: bool = False,
    gguf_cached: bool = False,
    cast_source_bytes: int = 0,
) -> ModelRunTerms:
    act = DTYPE_BYTES[dtype]
    bt = workload.batch * workload.tokens
    forward_batch = min(workload.forward_batch or workload.batch, workload.batch)
    forward_bt = forward_batch * workload.tokens
    states = min(workload.states or arch.n_layers + 1, arch.n_layers + 1)
    residual_bytes = (states + min(workload.components, 2 * arch.n_layers)) * bt * arch.d_model * act
    width = arch.d_mlp
    if arch.rule.moe:
        width = max(width, arch.d_moe * (arch.n_shared_experts + arch.experts_per_token))
    heads_dim = (arch.n_heads + 2 * arch.n_kv_heads) * arch.head_dim
    # A checkpoint stored in another dtype than the run's is memory-mapped and read page by page
    # while it is cast: those pages count in the process's memory until the load ends.
    load = CAST_SOURCE_RESIDENT * cast_source_bytes
    nf4_load = 0.0
    if gguf_file_bytes and not gguf_cached:
        transient = GGUF_DEQUANT_FACTOR * params * 4 + gguf_file_bytes
        load = max(load, transient + params * (4 - act))
        nf4_load = transient + params * 4
    if nf4_cached:
        nf4_load = 0.0
    return ModelRunTerms(
        residuals=gib(residual_bytes),
        metrics_upcast=gib((3 * bt * arch.d_model * 4 + 30 * states * bt * 4) / 2),
        logits=gib(forward_batch * arch.vocab_size * (act + 4)),
        attention_scores=gib(forward_batch * arch.n_heads * workload.tokens**2 * (2 * act + 4)),
        activations=gib(forward_bt * (4 * arch.d_model + 3 * width + heads_dim) * act),
        load_transient=gib(load),
        nf4_load_transient=gib(nf4_load),
        bridge_host=BRIDGE_HOST_GIB_PER_BLOCK * arch.n_layers,
        logit_lens=gib(lens_working_bytes(bt, arch.vocab_size, act, workload.lens_chunk_bytes,
                                          keeps_finals=not workload.lens_final_only) / 2)
        if workload.logit_lens else 0.0,
        head=gib(arch.vocab_size * arch.d_model * act) if workload.logit_lens else 0.0,
    )


def skip_savings_gib(terms: ModelRunTerms, arch: Architecture, skipped: int) -> float:
    """Capture memory saved by not capturing the first ``skipped`` states of one model."""
    if skipped < 0 or skipped > arch.n_layers:
        raise ConfigError(f"cannot skip {skipped} of {arch.n_layers + 1} residual states")
    per_state = (terms.residuals + terms.metrics_upcast) / (arch.n_layers + 1)
    return per_state * skipped
