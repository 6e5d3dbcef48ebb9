"""TransformerBridge's norms skip the statistics that no hook reads.

TransformerLens 4.3's ``NormalizationBridge`` exposes ``hook_scale`` and ``hook_normalized``
inside every norm. To feed them it computes the norm's statistics itself on every forward,
whether or not anything is attached:

- RMSNorm and Nemotron's LayerNorm1P (the native-autograd path,
  ``_hf_autograd_forward_with_hooks``): ``pow``, ``mean``, two ``add``\\ s, ``rsqrt``,
  ``sqrt`` and ``mul`` over the whole ``[batch, pos, d_model]`` input, then it calls the HF
  norm, which computes them again. That is the bridge's only extra arithmetic against a bare
  HF forward: 7 element-wise passes per norm, 61 norms per SmolLM2 forward.
- GPT-2's LayerNorm (the python path, ``_python_norm_forward``): the whole norm is rebuilt
  from ``sub``/``mean``/``pow``/``sqrt``/``div``/``mul``/``add`` instead of HF's one fused
  ``layer_norm``, and its output differs from HF's at float rounding.

A lens_compare run reads the residual stream (and the blocks' attention and MLP outputs),
never those two hooks. So each norm of a booted bridge becomes a subclass of its own class
that, while neither hook has anything attached, runs ``hook_in``, the HF norm itself and
``hook_out``: exactly the output the native path returns in that case, and HF's own output
on the python path. As soon as a hook is attached to ``hook_scale`` or ``hook_normalized``
(a notebook user's ``run_with_cache`` of ``ln1.hook_scale``, an intervention, a backward
hook), the norm runs TransformerLens's own forward unchanged. Nothing is forked: the
subclass overrides ``forward`` only and defers to it.
"""

import functools
import logging

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

logger = logging.getLogger(__name__)


def _attached(hook: HookPoint) -> bool:
    """Whether anything can observe or edit ``hook``: TransformerLens's own handles, or hooks
    registered on the module with torch's API directly."""
    return bool(hook.fwd_hooks or hook.bwd_hooks or hook._forward_hooks or hook._forward_pre_hooks
                or hook._backward_hooks)


class SkipsUnreadStatistics:
    """Mixed in before a ``NormalizationBridge`` class (see the module docstring)."""

    def statistics_read(self) -> bool:
        """Whether TransformerLens's own forward must run: a hook on the statistics, or a bridge
        in compatibility mode, whose processed weights only that forward knows about."""
        return (_attached(self.hook_scale) or _attached(self.hook_normalized) or self.compatibility_mode
                or bool(getattr(self.config, "layer_norm_folding", False)))

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.original_component is None or self.statistics_read():
            return super().forward(hidden_states, **kwargs)
        hidden_states = self.hook_in(hidden_states)
        result = self.original_component(hidden_states)
        if result.dtype != hidden_states.dtype:
            # As TransformerLens's native path does: the block's stream keeps its dtype.
            result = result.to(hidden_states.dtype)
        return self.hook_out(result)


@functools.cache
def _skipping(cls: type) -> type:
    return type(f"{cls.__name__}SkipsUnreadStatistics", (SkipsUnreadStatistics, cls), {})


def _plain_norm(module: nn.Module) -> bool:
    """A norm bridge that uses ``NormalizationBridge``'s own forward and affine step: the
    parameter-free pre-norms (LNPre, RMSPre) and subclasses with forwards of their own are
    left alone."""
    cls = type(module)
    return (isinstance(module, NormalizationBridge) and not isinstance(module, SkipsUnreadStatistics)
            and cls.forward is NormalizationBridge.forward
            and cls._apply_weight_and_bias is NormalizationBridge._apply_weight_and_bias)


def skip_unread_norm_statistics(bridge: nn.Module) -> int:
    """Make every plain norm of ``bridge`` skip the statistics no hook reads; returns how many.

    Idempotent. The bridge's outputs are unchanged on the native path (bit for bit) and become
    HF's own on the python path (GPT-2's LayerNorm).
    """
    norms = [module for module in bridge.modules() if _plain_norm(module)]
    for module in norms:
        module.__class__ = _skipping(type(module))
    logger.debug("%d norm bridges skip their unread statistics", len(norms))
    return len(norms)


def restore_transformer_lens_norms(bridge: nn.Module) -> int:
    """Undo ``skip_unread_norm_statistics``: every norm runs TransformerLens's own forward again
    (its statistics computed on every call; GPT-2's LayerNorm rebuilt in Python). Returns how
    many norms changed. For comparisons with TransformerLens as shipped (the benchmark's
    ``stock`` column, the tests)."""
    norms = [module for module in bridge.modules() if isinstance(module, SkipsUnreadStatistics)]
    for module in norms:
        module.__class__ = next(cls for cls in type(module).__mro__[1:]
                                if not issubclass(cls, SkipsUnreadStatistics))
    return len(norms)
