"""Declarative per-family layout rules: which tensors a decoder block of each
``model_type`` instantiates in transformers.

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
    "qwen2": FamilyRule("gqa", True, False, "gated", False, "rms"),
    "llama": FamilyRule("gqa", "attention_bias", "attention_bias", "gated", "mlp_bias", "rms"),
    "mistral": FamilyRule("gqa", False, False, "gated", False, "rms"),
    # Squared-ReLU up/down MLP and LayerNorm1P (gain and bias).
    "nemotron": FamilyRule(
        "gqa", "attention_bias", "attention_bias", "plain", "mlp_bias", "layernorm"
    ),
    "deepseek_v3": FamilyRule(
        "mla", "attention_bias", "attention_bias", "gated", False, "rms",
        moe=True, required=_DEEPSEEK_REQUIRED,
    ),
    # Conv1D projections all carry a bias; learned absolute positions (wpe).
    "gpt2": FamilyRule(
        "gqa", True, True, "plain", True, "layernorm", learned_positions=True,
        required=("vocab_size", "n_embd", "n_layer", "n_head"),
    ),
}


def family_rule(model_type: str) -> FamilyRule:
    """The rule for ``model_type``; unknown families get a suggestion."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    close = difflib.get_close_matches(str(model_type), list(FAMILIES), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} has no planner layout rule.{hint} Supported: "
        f"{', '.join(FAMILIES)}. Add a FamilyRule to lens_compare/hardware/families.py."
    )
