"""The bridge's norms skip the statistics no hook reads (``lens_compare.capture.norm_statistics``).

A capture must cost what a bare HF forward costs: the same arithmetic, counted op by op at
the dispatcher, and the same numbers, bit for bit. Hooks on ``hook_scale`` /
``hook_normalized`` must still see and edit what TransformerLens gives them.
"""

import collections
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
from transformers import AutoModelForCausalLM

from lens_compare.capture.norm_statistics import (
    SkipsUnreadStatistics,
    restore_transformer_lens_norms,
    skip_unread_norm_statistics,
)
from lens_compare.capture.states import capture_states
from lens_compare.util.hooks import states_for_layers
from tests.fixtures.bridges import load_bridge, padded_batch, reference_model
from tests.fixtures.tiny_models import FAMILIES

# The element-wise arithmetic of a norm (RMSNorm: pow, mean, add, rsqrt, mul; LayerNorm one
# fused layer_norm) and of the rest of a block. Counted per forward, they must not exceed HF's.
ARITHMETIC = ("pow", "mean", "add", "sub", "mul", "div", "rsqrt", "sqrt", "layer_norm", "silu", "gelu",
              "softmax", "_softmax")
# Once per forward, outside the blocks: lens_compare's padding check and the bridge's mask.
PER_FORWARD = {"sub": 1}


class OpCensus(TorchDispatchMode):
    """How many times each aten op runs inside the ``with`` block."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _hf_hidden_states(directory, ids, real, census=None):
    model = reference_model(directory)
    with torch.inference_mode(), census or _null():
        return model(ids, attention_mask=real.long(), output_hidden_states=True, use_cache=False).hidden_states


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_does_the_arithmetic_of_a_bare_forward_and_equals_it_bit_for_bit(family, tiny_model_dirs):
    bridge, tokenizer = load_bridge(tiny_model_dirs[family])
    ids, real = padded_batch(tokenizer)
    n_layers = bridge.cfg.n_layers
    norms = [m for m in bridge.modules() if isinstance(m, NormalizationBridge)]
    assert norms and all(isinstance(m, SkipsUnreadStatistics) for m in norms)
    with OpCensus() as captured_ops:
        captured = capture_states(bridge, ids, real, states_for_layers(tuple(range(n_layers))), batch_size=3,
                                  label=family)
    bare_ops = OpCensus()
    hidden = _hf_hidden_states(tiny_model_dirs[family], ids, real, bare_ops)
    excess = {op: (captured_ops.counts[op], bare_ops.counts[op]) for op in ARITHMETIC
              if captured_ops.counts[op] > bare_ops.counts[op] + PER_FORWARD.get(op, 0)}
    assert not excess, f"{family}: ops the capture runs beyond a bare forward (capture, bare): {excess}"
    assert captured_ops.counts["pow"] + captured_ops.counts["layer_norm"] > 0  # the census saw the norms
    for state in range(n_layers):
        assert torch.equal(captured.values[state][real], hidden[state][real]), f"{family}: state {state}"


@pytest.mark.parametrize("family", ["llama", "nemotron"])
def test_native_path_output_is_transformer_lens_own_bit_for_bit(family, tiny_model_dirs):
    """On the native-autograd path TransformerLens returns the HF norm's output when nothing
    edits the statistics: skipping them changes no bit of any state."""
    bridge, tokenizer = load_bridge(tiny_model_dirs[family])
    ids, real = padded_batch(tokenizer)
    states = states_for_layers(tuple(range(bridge.cfg.n_layers)))
    lean = capture_states(bridge, ids, real, states, batch_size=3, label="lean")
    n_norms = restore_transformer_lens_norms(bridge)
    assert n_norms == 2 * bridge.cfg.n_layers + 1
    assert not any(isinstance(m, SkipsUnreadStatistics) for m in bridge.modules())
    assert {type(m).__name__ for m in bridge.modules() if isinstance(m, NormalizationBridge)} \
        == {"RMSNormalizationBridge" if family == "llama" else "NormalizationBridge"}
    reference = capture_states(bridge, ids, real, states, batch_size=3, label="stock")
    assert torch.equal(lean.values, reference.values)
    assert skip_unread_norm_statistics(bridge) == n_norms
    assert skip_unread_norm_statistics(bridge) == 0  # idempotent


def test_bfloat16_capture_equals_hf_bit_for_bit(tiny_model_dirs):
    bridge, tokenizer = load_bridge(tiny_model_dirs["llama"], dtype="bfloat16")
    ids, real = padded_batch(tokenizer)
    captured = capture_states(bridge, ids, real, states_for_layers((0, 1, 2)), batch_size=3, label="bf16")
    # Loaded in bfloat16, not cast afterwards: ``.to`` would also round the rotary inv_freq buffer.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"], attn_implementation="eager",
                                                 dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        hidden = model(ids, attention_mask=real.long(), output_hidden_states=True, use_cache=False).hidden_states
    assert captured.values.dtype == torch.bfloat16
    for state in range(3):
        assert torch.equal(captured.values[state][real], hidden[state][real])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hooked_statistics_still_fire_and_edit(family, tiny_model_dirs):
    """A hook on hook_scale / hook_normalized runs TransformerLens's own forward: caching sees
    the statistics, an edit changes the stream, and removing the hooks restores the lean path."""
    bridge, tokenizer = load_bridge(tiny_model_dirs[family])
    ids, real = padded_batch(tokenizer)
    names = ["blocks.0.ln1.hook_scale", "blocks.0.ln1.hook_normalized", "blocks.1.hook_resid_pre"]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, attention_mask=real.long(), names_filter=names,
                                         return_cache_object=False)
    x = cache["blocks.1.hook_resid_pre"]
    assert set(names) <= set(cache)
    scale, normalized = cache[names[0]], cache[names[1]]
    assert scale.shape[-1] == 1 and normalized.shape == x.shape
    assert torch.isfinite(scale).all() and (scale > 0).all()

    def halve(tensor, hook):
        return tensor * 0.5

    with torch.no_grad(), pytest.warns(UserWarning) if family != "gpt2" else _null():
        edited = bridge.run_with_hooks(ids, attention_mask=real.long(), fwd_hooks=[(names[1], halve)])
        plain = bridge(ids, attention_mask=real.long())
    assert not torch.allclose(edited, plain)
    norm = bridge.blocks[0].ln1
    assert not norm.statistics_read()  # the hooks were removed with the context


def test_nothing_of_the_forward_outlives_its_batch(tiny_model_dirs):
    """Between batches (``on_batch``) and after the capture, the only new activation-shaped
    tensor alive is the buffer of captured states: no batch's cache (or logits) lives on
    through the next forward. (The batch's 2-d mask slices are views of the input mask.)"""
    bridge, tokenizer = load_bridge(tiny_model_dirs["llama"])
    ids, real = padded_batch(tokenizer)
    states = states_for_layers((0, 1, 2))
    capture_states(bridge, ids, real, states, batch_size=1, label="warm-up")

    def live_tensors():
        gc.collect()
        # type(), not isinstance(): a deprecated torch.distributed alias warns on attribute access.
        return [t for t in gc.get_objects() if issubclass(type(t), torch.Tensor)]

    before = {id(t) for t in live_tensors()}
    between = []

    def on_batch(_n):
        between.append([tuple(t.shape) for t in live_tensors() if id(t) not in before and t.dim() >= 3])

    captured = capture_states(bridge, ids, real, states, batch_size=1, label="capture", on_batch=on_batch)
    new = [t for t in live_tensors() if id(t) not in before]
    assert any(t is captured.values for t in new)  # the census does see tensors
    assert [t for t in new if t is not captured.values] == []
    assert between == [[tuple(captured.values.shape)]] * len(ids)
