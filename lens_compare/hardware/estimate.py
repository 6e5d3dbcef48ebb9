"""Everything the planner knows about one model of a pair, computed once from its config."""

import functools
from dataclasses import dataclass
from typing import Any

from lens_compare.hardware.precision import PRECISIONS, WeightBytes, weight_bytes
from lens_compare.hardware.run_memory import ModelRunTerms, Workload, model_run_terms
from lens_compare.models.architecture import Architecture
from lens_compare.models.params import (
    ParamCount,
    block_groups,
    chunk_groups,
    count_params,
    load_order,
    model_groups,
)
from lens_compare.util.choices import DTYPE_BYTES


@dataclass(frozen=True)
class Checkpoint:
    """How the weights are stored on disk: ``precision`` is a PRECISIONS name or ``gguf``."""

    precision: str
    fp8_block: tuple[int, int] | None = None
    gguf_file_bytes: int = 0
    note: str | None = None
    # An NF4 copy of these weights is already in lens_compare's cache (CPU runs).
    nf4_cached: bool = False
    # A GGUF's weights are in lens_compare's cache already, dequantized (lens_compare.models.gguf): read
    # as float32 safetensors, nothing dequantized.
    gguf_cached: bool = False


@dataclass(frozen=True)
class ModelEstimate:
    ref: str
    arch: Architecture
    params: ParamCount
    checkpoint: Checkpoint
    dtype: str
    # Weight precision for 'resident' and 'sequential' (the activation dtype, or fp8).
    precision: str
    weights: dict[str, WeightBytes]
    largest_block: dict[str, WeightBytes]
    terms: ModelRunTerms
    # Bytes of each indivisible module in device-map order (params.load_order), per precision.
    chunks: dict[str, tuple[int, ...]]

    @property
    def disk_gib(self) -> float:
        if self.checkpoint.precision == "gguf":
            # Read from its dequantized float32 copy once cached; the first run reads the GGUF.
            if self.checkpoint.gguf_cached:
                return self.weights["float32"].gib
            return self.checkpoint.gguf_file_bytes / 2**30
        return self.weights[self.checkpoint.precision].gib

    def to_dict(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "model_type": self.arch.model_type,
            "params": self.params.to_dict(),
            "checkpoint_precision": self.checkpoint.precision,
            "dtype": self.dtype,
            "precision": self.precision,
            "weights_gib": {p: w.gib for p, w in self.weights.items()},
            "run_gib": self.terms.to_dict(),
        }


def estimate_model(
    ref: str, arch: Architecture, checkpoint: Checkpoint, dtype: str, precision: str,
    workload: Workload, *, nf4_double_quant: bool = False,
) -> ModelEstimate:
    params = count_params(arch)
    # Without a block size an FP8 checkpoint scales per output row (fbgemm).
    fp8_block = checkpoint.fp8_block if checkpoint.precision == "fp8" else (128, 128)
    weights, largest_block, chunks = _weights(arch, fp8_block, nf4_double_quant, DTYPE_BYTES[dtype])
    return ModelEstimate(
        ref=ref,
        arch=arch,
        params=params,
        checkpoint=checkpoint,
        dtype=dtype,
        precision=precision,
        weights=weights,
        largest_block=largest_block,
        terms=model_run_terms(
            arch, dtype, workload, params=params.total, gguf_file_bytes=checkpoint.gguf_file_bytes,
            nf4_cached=checkpoint.nf4_cached, gguf_cached=checkpoint.gguf_cached,
            cast_source_bytes=cast_source_bytes(checkpoint, dtype, weights),
        ),
        chunks=chunks,
    )


def cast_source_bytes(checkpoint: Checkpoint, dtype: str, weights: dict[str, WeightBytes]) -> int:
    """Bytes of a memory-mapped checkpoint cast to ``dtype`` as it loads (0 when it holds ``dtype``, or
    when it is not mapped: a GGUF not yet in the cache is dequantized, which the GGUF terms count)."""
    if checkpoint.precision == "gguf":
        source = "float32" if checkpoint.gguf_cached else None
    else:
        source = checkpoint.precision
    return 0 if source is None or source == dtype or source not in weights else weights[source].total


@functools.cache
def _weights(arch: Architecture, fp8_block: tuple[int, int] | None, nf4_double_quant: bool, unquantized_bytes: int):
    """Weight bytes per precision (whole model, largest block) and per-module bytes, which depend
    on the architecture alone: computed once per process (the seed's table plans each pair on a
    thousand machines)."""
    groups = model_groups(arch)
    block = max(
        (block_groups(arch, 1, moe) for moe in {False, arch.rule.moe}),
        key=lambda gs: sum(g.numel for g in gs),
    )
    kw = dict(fp8_block=fp8_block, nf4_double_quant=nf4_double_quant, nf4_unquantized_bytes=unquantized_bytes)
    weights = {p: weight_bytes(groups, p, **kw) for p in PRECISIONS}
    largest_block = {p: weight_bytes(block, p, **kw) for p in PRECISIONS}
    return weights, largest_block, _chunk_bytes(arch, kw)


def _chunk_bytes(arch: Architecture, kw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    kinds = chunk_groups(arch)
    order = load_order(arch)
    out = {}
    # float32 buffers that are not parameters: rotary inv_freq and original_inv_freq
    # (rotary_dim / 2 each), DeepSeek's per-expert e_score_correction_bias.
    buffers = {"rotary": 4 * arch.rotary_dim, "moe": 4 * arch.n_routed_experts}
    for p in PRECISIONS:
        per_kind = {kind: weight_bytes(groups, p, **kw).total for kind, groups in kinds.items()}
        out[p] = tuple(per_kind.get(kind, 0) + buffers.get(kind, 0) for _, kind in order)
    return out
