"""Declarative per-family rules: which tensors a decoder block of each ``model_type``
instantiates in transformers (the planner's sizes), and how to run its blocks one at a
time from a checkpoint (``StreamRule``, read by ``lens_compare.capture.streamed``).

A rule field is either a constant or the name of a config field that switches it,
so a family never needs a code branch of its own. Checked against
``sum(p.numel() for p in model.parameters())`` for every family in
``tests/test_planner_params.py``.
"""

import difflib
from dataclasses import dataclass
from typing import Literal

from lens_compare.errors import UnsupportedArchitectureError

Switch = bool | str


@dataclass(frozen=True)
class ExpertMerge:
    """Per-expert checkpoint tensors fused into one parameter the modelling code holds.

    ``target`` (relative to a block) is stacked over experts; each expert's slice is the
    concatenation along dim 0 of its ``sources`` (``{expert}`` is the expert's index), as
    transformers' conversion mapping does when it loads such a checkpoint.
    """

    target: str
    sources: tuple[str, ...]
    count_field: str


@dataclass(frozen=True)
class StreamRule:
    """How a family's model runs block by block (``lens_compare.capture.streamed``).

    Names are attributes of the base model (``model.model`` or ``model.transformer``).
    ``masks``: ``causal`` for every block; ``layer_types`` when the config's ``layer_types``
    names each block's attention (``sliding_attention`` gets a sliding-window mask);
    ``sliding_window`` when every block slides as soon as ``config.sliding_window`` is set.
    """

    blocks: str = "layers"
    token_embedding: str = "embed_tokens"
    # Learned absolute positions added to the token embedding (GPT-2's wpe).
    position_embedding: str | None = None
    # The rotary module, built once for all blocks; None where there is none.
    rotary: str | None = "rotary_emb"
    masks: Literal["causal", "layer_types", "sliding_window"] = "causal"
    expert_merges: tuple[ExpertMerge, ...] = ()
    # A block's attention and MLP modules, whose outputs are its two writes into the stream
    # (what TransformerBridge's hook_attn_out / hook_mlp_out read).
    attention: str = "self_attn"
    mlp: str = "mlp"
    # The final norm, applied to the last block's output before the unembedding (the logit lens).
    final_norm: str = "norm"


@dataclass(frozen=True)
class FamilyRule:
    """How one family lays out its blocks (transformers' modeling file is the reference)."""

    attention: Literal["gqa", "mla"]
    qkv_bias: Switch
    o_bias: Switch
    mlp: Literal["gated", "plain"]
    mlp_bias: Switch
    # "rms": one gain vector; "layernorm": gain and bias.
    norm: Literal["rms", "layernorm"]
    learned_positions: bool = False
    moe: bool = False
    # None: the family cannot stream (``--strategy stream`` refuses it).
    stream: StreamRule | None = None
    # Fields a config must state; everything else may take the config class default.
    required: tuple[str, ...] = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )


_DEEPSEEK_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "first_k_dense_replace",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)

FAMILIES: dict[str, FamilyRule] = {
    # Qwen2Attention hard-codes bias=True on q/k/v and bias=False on o_proj.
    "qwen2": FamilyRule("gqa", True, False, "gated", False, "rms", stream=StreamRule(masks="layer_types")),
    "llama": FamilyRule("gqa", "attention_bias", "attention_bias", "gated", "mlp_bias", "rms", stream=StreamRule()),
    "mistral": FamilyRule("gqa", False, False, "gated", False, "rms", stream=StreamRule(masks="sliding_window")),
    # Squared-ReLU up/down MLP and LayerNorm1P (gain and bias).
    "nemotron": FamilyRule(
        "gqa", "attention_bias", "attention_bias", "plain", "mlp_bias", "layernorm", stream=StreamRule()
    ),
    # Checkpoints store each routed expert apart; transformers 5 fuses them
    # (gate_up_proj [expert, 2 x moe_intermediate, hidden], down_proj [expert, hidden, moe_intermediate]).
    "deepseek_v3": FamilyRule(
        "mla", "attention_bias", "attention_bias", "gated", False, "rms",
        moe=True, required=_DEEPSEEK_REQUIRED,
        stream=StreamRule(expert_merges=(
            ExpertMerge("mlp.experts.gate_up_proj",
                        ("mlp.experts.{expert}.gate_proj.weight", "mlp.experts.{expert}.up_proj.weight"),
                        "n_routed_experts"),
            ExpertMerge("mlp.experts.down_proj", ("mlp.experts.{expert}.down_proj.weight",), "n_routed_experts"),
        )),
    ),
    # Conv1D projections all carry a bias; learned absolute positions (wpe).
    "gpt2": FamilyRule(
        "gqa", True, True, "plain", True, "layernorm", learned_positions=True,
        required=("vocab_size", "n_embd", "n_layer", "n_head"),
        stream=StreamRule(blocks="h", token_embedding="wte", position_embedding="wpe", rotary=None,
                          attention="attn", final_norm="ln_f"),
    ),
}


def final_norm_path(model_type: str) -> str | None:
    """The final norm's path in the base model, where the family is known (else None)."""
    rule = FAMILIES.get(model_type)
    return None if rule is None or rule.stream is None else rule.stream.final_norm


def stream_rule(model_type: str) -> StreamRule:
    """How ``model_type`` streams; families without a rule are refused, naming those with one."""
    rule = FAMILIES.get(model_type)
    if rule is None or rule.stream is None:
        streamable = [name for name, family in FAMILIES.items() if family.stream is not None]
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} has no streaming rule, so --strategy stream cannot run it; "
            f"families that stream: {', '.join(streamable)} (add a StreamRule in "
            "lens_compare/models/families.py), or use another --strategy"
        )
    return rule.stream


def family_rule(model_type: str) -> FamilyRule:
    """The rule for ``model_type``; unknown families get a suggestion."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    close = difflib.get_close_matches(str(model_type), list(FAMILIES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no planner layout rule.{hint} Supported: "
        f"{', '.join(FAMILIES)}. Add a FamilyRule to lens_compare/models/families.py."
    )
