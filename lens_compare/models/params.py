"""Every weight tensor a model instantiates, as shape groups, and the counts derived from them.

A :class:`TensorGroup` is one tensor shape repeated ``copies`` times (e.g. the q
projection of all 32 layers). Weight bytes per precision are computed from the same
groups (``precision.py``), so a count and its bytes can never disagree.

>>> from lens_compare.models.architecture import architecture_from_config
>>> arch = architecture_from_config({"model_type": "llama", "vocab_size": 49152,
...     "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
...     "num_key_value_heads": 3, "intermediate_size": 1536, "tie_word_embeddings": True})
>>> count_params(arch).total
134515008
"""

from dataclasses import dataclass
from typing import Any, Literal

from lens_compare.models.architecture import Architecture

# What a tensor is decides how each precision stores it: "linear" weights are what
# bitsandbytes and FP8 checkpoints quantize; "experts" are DeepSeek's fused 3-D expert
# parameters (not nn.Linear, so bitsandbytes leaves them alone); the rest stay 16-bit.
Kind = Literal["embedding", "unembedding", "linear", "experts", "bias", "norm", "router"]


@dataclass(frozen=True)
class TensorGroup:
    name: str
    kind: Kind
    shape: tuple[int, ...]
    copies: int = 1
    # Routed experts: only experts_per_token of the shape's first dim act per token.
    active_fraction: float = 1.0

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n * self.copies


@dataclass(frozen=True)
class ParamCount:
    total: int
    active: int
    mtp: int
    by_kind: dict[str, int]
    per_layer_max: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "active": self.active,
            "mtp": self.mtp,
            "by_kind": dict(self.by_kind),
            "per_layer_max": self.per_layer_max,
        }


def _norm(arch: Architecture, name: str, dim: int, copies: int) -> list[TensorGroup]:
    groups = [TensorGroup(f"{name}.weight", "norm", (dim,), copies)]
    if arch.rule.norm == "layernorm":
        groups.append(TensorGroup(f"{name}.bias", "norm", (dim,), copies))
    return groups


def _linear(name: str, out_dim: int, in_dim: int, copies: int, bias: bool) -> list[TensorGroup]:
    groups = [TensorGroup(f"{name}.weight", "linear", (out_dim, in_dim), copies)]
    if bias:
        groups.append(TensorGroup(f"{name}.bias", "bias", (out_dim,), copies))
    return groups


def attention_groups(arch: Architecture, copies: int) -> list[TensorGroup]:
    d = arch.d_model
    if arch.rule.attention == "mla":
        qk_head = arch.qk_nope_head_dim + arch.qk_rope_head_dim
        groups: list[TensorGroup] = []
        if arch.q_lora_rank is None:
            groups += _linear("q_proj", arch.n_heads * qk_head, d, copies, False)
        else:
            groups += _linear("q_a_proj", arch.q_lora_rank, d, copies, arch.qkv_bias)
            groups += _norm(arch, "q_a_layernorm", arch.q_lora_rank, copies)
            groups += _linear("q_b_proj", arch.n_heads * qk_head, arch.q_lora_rank, copies, False)
        kv_a = arch.kv_lora_rank + arch.qk_rope_head_dim
        groups += _linear("kv_a_proj_with_mqa", kv_a, d, copies, arch.qkv_bias)
        groups += _norm(arch, "kv_a_layernorm", arch.kv_lora_rank, copies)
        kv_b = arch.n_heads * (arch.qk_nope_head_dim + arch.v_head_dim)
        groups += _linear("kv_b_proj", kv_b, arch.kv_lora_rank, copies, False)
        groups += _linear("o_proj", d, arch.n_heads * arch.v_head_dim, copies, arch.o_bias)
        return groups
    q = arch.n_heads * arch.head_dim
    kv = arch.n_kv_heads * arch.head_dim
    return (
        _linear("q_proj", q, d, copies, arch.qkv_bias)
        + _linear("k_proj", kv, d, copies, arch.qkv_bias)
        + _linear("v_proj", kv, d, copies, arch.qkv_bias)
        + _linear("o_proj", d, q, copies, arch.o_bias)
    )


def mlp_groups(arch: Architecture, name: str, d_mlp: int, copies: int) -> list[TensorGroup]:
    d = arch.d_model
    ins = ["gate_proj", "up_proj"] if arch.rule.mlp == "gated" else ["up_proj"]
    groups = [g for n in ins for g in _linear(f"{name}.{n}", d_mlp, d, copies, arch.mlp_bias)]
    return groups + _linear(f"{name}.down_proj", d, d_mlp, copies, arch.mlp_bias)


def moe_groups(arch: Architecture, copies: int) -> list[TensorGroup]:
    d, e, dm = arch.d_model, arch.n_routed_experts, arch.d_moe
    frac = arch.experts_per_token / e
    return [
        # The router weight is created float32; the checkpoint stores it in bf16.
        TensorGroup("gate.weight", "router", (e, d), copies),
        TensorGroup("experts.gate_up_proj", "experts", (e, 2 * dm, d), copies, frac),
        TensorGroup("experts.down_proj", "experts", (e, d, dm), copies, frac),
        *mlp_groups(arch, "shared_experts", dm * arch.n_shared_experts, copies),
    ]


def block_groups(arch: Architecture, copies: int, moe: bool) -> list[TensorGroup]:
    """One decoder block (attention, MLP or MoE, two norms) repeated ``copies`` times."""
    mlp = moe_groups(arch, copies) if moe else mlp_groups(arch, "mlp", arch.d_mlp, copies)
    return (
        _norm(arch, "input_layernorm", arch.d_model, copies)
        + attention_groups(arch, copies)
        + _norm(arch, "post_attention_layernorm", arch.d_model, copies)
        + mlp
    )


def _block_layout(arch: Architecture) -> list[tuple[int, bool]]:
    """(copies, is_moe) for the dense and MoE stretches of the stack."""
    if not arch.rule.moe:
        return [(arch.n_layers, False)]
    dense = min(arch.first_dense_layers, arch.n_layers)
    return [(c, m) for c, m in ((dense, False), (arch.n_layers - dense, True)) if c > 0]


def model_groups(arch: Architecture) -> list[TensorGroup]:
    """All parameters transformers instantiates (tied unembedding counted once)."""
    d = arch.d_model
    groups = [TensorGroup("embed_tokens.weight", "embedding", (arch.vocab_size, d))]
    if arch.rule.learned_positions:
        groups.append(TensorGroup("wpe.weight", "embedding", (arch.n_positions, d)))
    for copies, moe in _block_layout(arch):
        groups += block_groups(arch, copies, moe)
    groups += _norm(arch, "norm", d, 1)
    if not arch.tied_embeddings:
        groups.append(TensorGroup("lm_head.weight", "unembedding", (arch.vocab_size, d)))
    return groups


def load_order(arch: Architecture) -> list[tuple[str, str]]:
    """The indivisible modules a device map places, in the order it fills GPUs, as
    ``(name, kind)``: embeddings, each decoder block (``dense`` or ``moe``), the final
    norm and the untied output head. A tied head shares the embedding's tensor and
    takes no room of its own."""
    order = [("embed_tokens", "embedding")]
    if arch.rule.learned_positions:
        order.append(("wpe", "positions"))
    index = 0
    for copies, moe in _block_layout(arch):
        for _ in range(copies):
            order.append((f"layers.{index}", "moe" if moe else "dense"))
            index += 1
    order.append(("norm", "norm"))
    if arch.rotary_dim:
        order.append(("rotary_emb", "rotary"))
    if not arch.tied_embeddings:
        order.append(("lm_head", "unembedding"))
    return order


def chunk_groups(arch: Architecture) -> dict[str, list[TensorGroup]]:
    """The tensors of each kind of module in :func:`load_order`."""
    d = arch.d_model
    groups = {
        "embedding": [TensorGroup("embed_tokens.weight", "embedding", (arch.vocab_size, d))],
        "positions": [TensorGroup("wpe.weight", "embedding", (arch.n_positions, d))],
        "dense": block_groups(arch, 1, False),
        "norm": _norm(arch, "norm", d, 1),
        "unembedding": [TensorGroup("lm_head.weight", "unembedding", (arch.vocab_size, d))],
    }
    if arch.rule.moe:
        groups["moe"] = block_groups(arch, 1, True)
    return groups


def mtp_groups(arch: Architecture) -> list[TensorGroup]:
    """DeepSeek's multi-token-prediction layers as the checkpoint stores them.

    Each is a full MoE block plus enorm/hnorm, the eh_proj (2d -> d) and its own
    copies of the embedding and output head (DeepSeek-V3 README_WEIGHTS.md), which is
    how 671B + 14B = 685B. transformers does not instantiate them.
    """
    n, d = arch.mtp_layers, arch.d_model
    if n == 0:
        return []
    return (
        block_groups(arch, n, moe=True)
        + _norm(arch, "enorm", d, n)
        + _norm(arch, "hnorm", d, n)
        + [TensorGroup("eh_proj.weight", "linear", (d, 2 * d), n)]
        + _norm(arch, "shared_head.norm", d, n)
        + [
            TensorGroup("embed_tokens.weight", "embedding", (arch.vocab_size, d), n),
            TensorGroup("shared_head.head.weight", "unembedding", (arch.vocab_size, d), n),
        ]
    )


def largest_block_params(arch: Architecture) -> int:
    """Parameters of the biggest single block: the unit a device map cannot split."""
    return max(sum(g.numel for g in block_groups(arch, 1, moe)) for _, moe in _block_layout(arch))


def count_params(arch: Architecture) -> ParamCount:
    groups = model_groups(arch)
    by_kind: dict[str, int] = {}
    for g in groups:
        by_kind[g.kind] = by_kind.get(g.kind, 0) + g.numel
    return ParamCount(
        total=sum(g.numel for g in groups),
        active=round(sum(g.numel * g.active_fraction for g in groups)),
        mtp=sum(g.numel for g in mtp_groups(arch)),
        by_kind=by_kind,
        per_layer_max=largest_block_params(arch),
    )
