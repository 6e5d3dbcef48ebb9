"""Shape facts of one causal LM, read from its HF config (object or dict).

Dicts (a ``config.json``, an entry of ``model_configs.json``) are checked for the
family's required fields first and then completed by the transformers config class
of their ``model_type``, so every default the planner relies on is the one
transformers itself would instantiate with.

>>> arch = architecture_from_config({"model_type": "llama", "vocab_size": 49152,
...     "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
...     "num_key_value_heads": 3, "intermediate_size": 1536, "tie_word_embeddings": True})
>>> arch.head_dim, arch.n_kv_heads
(64, 3)
"""

import dataclasses
import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lens_compare.errors import ConfigError
from lens_compare.models.families import FamilyRule, family_rule


@dataclass(frozen=True)
class Architecture:
    model_type: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_mlp: int
    tied_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    rule: FamilyRule
    n_positions: int = 0
    # Multi-head latent attention (DeepSeek); q_lora_rank None means a plain q_proj.
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Mixture of experts (DeepSeek): layers below first_dense_layers keep a dense MLP.
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    experts_per_token: int = 0
    d_moe: int = 0
    first_dense_layers: int = 0
    mtp_layers: int = 0
    # Width of the rotary embedding (0 with learned positions): its float32 inv_freq
    # buffers are placed by a device map like any module.
    rotary_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def transformers_config(config: Any):
    """A transformers config object for ``config`` (a config object, or a config.json dict),
    refusing a family the planner does not know and dicts that lack the fields it counts from."""
    if not isinstance(config, Mapping):
        if not hasattr(config, "model_type"):
            raise ConfigError(
                f"expected a transformers PretrainedConfig or a config dict, got {type(config).__name__}"
            )
        family_rule(config.model_type)
        return config
    model_type = config.get("model_type")
    if not model_type:
        raise ConfigError(
            "config has no 'model_type'; expected a Hugging Face config.json "
            "(e.g. 'model_type': 'llama'). Pass the model's own config.json."
        )
    rule = family_rule(model_type)
    from transformers import AutoConfig

    cls = AutoConfig.for_model(model_type).__class__
    aliases = {v: k for k, v in getattr(cls, "attribute_map", {}).items()}
    missing = [f for f in rule.required if f not in config and aliases.get(f) not in config]
    if missing:
        raise ConfigError(
            f"{model_type} config is missing {', '.join(missing)}; the planner counts "
            "parameters from these fields and will not guess them. Use the model's full config.json."
        )
    declared = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    # A null the config class does not declare (Qwen2's head_dim) would shadow the
    # modeling code's own fallback; a declared null (DeepSeek's q_lora_rank) is meaningful.
    kwargs = {
        k: v
        for k, v in config.items()
        if k != "model_type" and not k.startswith("_") and (v is not None or k in declared)
    }
    return AutoConfig.for_model(model_type, **kwargs)


def _switch(cfg: Any, value: bool | str) -> bool:
    return bool(getattr(cfg, value, False)) if isinstance(value, str) else value


def architecture_from_config(config: Any) -> Architecture:
    """Normalise a PretrainedConfig or config dict into :class:`Architecture`.

    A config dict (the shipped ``model_configs.json`` entries, a local config.json) is read once per
    process: building its transformers config object costs milliseconds, and the seed's table plans
    every pair on a thousand machines."""
    if isinstance(config, Mapping):
        return _architecture_of_json(json.dumps(config, sort_keys=True, default=str))
    return _architecture(config)


@functools.cache
def _architecture_of_json(text: str) -> Architecture:
    return _architecture(json.loads(text))


def _architecture(config: Any) -> Architecture:
    cfg = transformers_config(config)
    rule = family_rule(cfg.model_type)
    d_model = int(cfg.hidden_size)
    n_heads = int(cfg.num_attention_heads)
    d_mlp = getattr(cfg, "intermediate_size", None)
    if d_mlp is None:
        d_mlp = getattr(cfg, "n_inner", None) or 4 * d_model
    head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
    fields: dict[str, Any] = dict(
        model_type=cfg.model_type,
        vocab_size=int(cfg.vocab_size),
        d_model=d_model,
        n_layers=int(cfg.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or n_heads),
        head_dim=int(head_dim),
        d_mlp=int(d_mlp),
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=_switch(cfg, rule.qkv_bias),
        o_bias=_switch(cfg, rule.o_bias),
        mlp_bias=_switch(cfg, rule.mlp_bias),
        rule=rule,
    )
    if rule.learned_positions:
        fields["n_positions"] = int(cfg.max_position_embeddings)
    else:
        fields["rotary_dim"] = int(head_dim * float(getattr(cfg, "partial_rotary_factor", None) or 1.0))
    if rule.attention == "mla":
        fields.update(
            q_lora_rank=cfg.q_lora_rank,
            kv_lora_rank=int(cfg.kv_lora_rank),
            qk_nope_head_dim=int(cfg.qk_nope_head_dim),
            qk_rope_head_dim=int(cfg.qk_rope_head_dim),
            v_head_dim=int(cfg.v_head_dim),
            rotary_dim=int(cfg.qk_rope_head_dim),
        )
    if rule.moe:
        fields.update(
            n_routed_experts=int(cfg.n_routed_experts),
            n_shared_experts=int(cfg.n_shared_experts),
            experts_per_token=int(cfg.num_experts_per_tok),
            d_moe=int(cfg.moe_intermediate_size),
            first_dense_layers=int(cfg.first_k_dense_replace),
            mtp_layers=int(getattr(cfg, "num_nextn_predict_layers", 0) or 0),
        )
    return Architecture(**fields)
