"""The only place that spells TransformerLens hook names.

A model with L blocks has L+1 distinct residual states: state ``s`` is the input
of block ``s`` (``blocks.{s}.hook_resid_pre``) for ``s < L`` and the output of the
last block (``blocks.{L-1}.hook_resid_post``) for ``s = L``. Since
``resid_post(l) == resid_pre(l + 1)``, lens_compare stores each state once and
exposes both hooks as views.

>>> resid_pre(3), resid_post(3)
('blocks.3.hook_resid_pre', 'blocks.3.hook_resid_post')
>>> state_hook_name(n_layers=30, state=30)
'blocks.29.hook_resid_post'

Each block also writes two sublayer outputs into the stream, ``attn_out`` and
``mlp_out`` (``COMPONENTS``); ``component_hook_name`` spells their hooks:

>>> component_hook_name("mlp_out", 3)
'blocks.3.hook_mlp_out'
"""

from typing import Literal

HookKind = Literal["resid_pre", "resid_post"]
HOOK_KINDS: tuple[HookKind, ...] = ("resid_pre", "resid_post")
Component = Literal["attn_out", "mlp_out"]
COMPONENTS: tuple[Component, ...] = ("attn_out", "mlp_out")


def resid_pre(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def resid_post(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def hook_name(kind: HookKind, layer: int) -> str:
    return resid_pre(layer) if kind == "resid_pre" else resid_post(layer)


def state_index(kind: HookKind, layer: int) -> int:
    """Which residual state the hook ``kind`` of block ``layer`` reads."""
    return layer if kind == "resid_pre" else layer + 1


def state_hook_name(n_layers: int, state: int) -> str:
    """The hook to capture residual state ``state`` from (``resid_pre`` wherever it exists)."""
    return resid_pre(state) if state < n_layers else resid_post(n_layers - 1)


def states_for_layers(layers: tuple[int, ...]) -> tuple[int, ...]:
    """The distinct states both hooks of ``layers`` need: ``{l} | {l + 1}``, sorted."""
    return tuple(sorted({*layers, *(layer + 1 for layer in layers)}))


def component_hook_name(component: Component, layer: int) -> str:
    """The bridge's hook on block ``layer``'s attention or MLP output (an alias of
    ``blocks.{layer}.attn.hook_out`` / ``blocks.{layer}.mlp.hook_out``)."""
    return f"blocks.{layer}.hook_{component}"
