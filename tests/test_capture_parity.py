"""Captured residuals against HF ``output_hidden_states``, for every architecture family."""

import pytest
import torch

from lens_compare.capture.states import capture_states
from lens_compare.util.hooks import resid_post, resid_pre, states_for_layers
from tests.fixtures.bridges import PROMPTS, load_bridge, padded_batch, reference_model
from tests.fixtures.tiny_models import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_pre_equals_hf_hidden_states(family, tiny_model_dirs):
    directory = tiny_model_dirs[family]
    bridge, tokenizer = load_bridge(directory)
    ids, real = padded_batch(tokenizer)
    n_layers = bridge.cfg.n_layers
    layers = tuple(range(n_layers))
    captured = capture_states(bridge, ids, real, states_for_layers(layers), batch_size=2, label=family)
    reference = reference_model(directory)
    final_norm_input = {}
    final_norm = reference.model.norm if hasattr(reference, "model") else reference.transformer.ln_f
    handle = final_norm.register_forward_pre_hook(lambda _m, args: final_norm_input.update(x=args[0]))
    with torch.no_grad():
        hidden = reference(ids, attention_mask=real.long(), output_hidden_states=True).hidden_states
    handle.remove()
    assert len(hidden) == n_layers + 1
    for layer in layers:
        torch.testing.assert_close(
            captured.resid_pre(layer)[real], hidden[layer][real], atol=1e-5, rtol=1.3e-6
        )
    # HF's last entry is taken after the final norm; the last resid_post is before it.
    torch.testing.assert_close(
        captured.resid_post(n_layers - 1)[real], final_norm_input["x"][real], atol=1e-5, rtol=1.3e-6
    )
    with torch.no_grad():
        torch.testing.assert_close(final_norm(captured.resid_post(n_layers - 1))[real], hidden[-1][real],
                                   atol=1e-5, rtol=1.3e-6)
    assert not torch.allclose(captured.resid_post(n_layers - 1)[real], hidden[-1][real], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_really_fire_and_post_equals_next_pre(family, tiny_model_dirs):
    """Guards the parity test: distinct layers differ, and the dedup of resid_post is sound."""
    bridge, tokenizer = load_bridge(tiny_model_dirs[family])
    ids, real = padded_batch(tokenizer)
    names = [resid_pre(layer) for layer in range(bridge.cfg.n_layers)]
    names += [resid_post(layer) for layer in range(bridge.cfg.n_layers)]
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, attention_mask=real.long(), names_filter=names,
                                         return_cache_object=False)
    assert set(names) <= set(cache)
    for layer in range(bridge.cfg.n_layers - 1):
        torch.testing.assert_close(cache[resid_post(layer)], cache[resid_pre(layer + 1)], atol=0, rtol=0)
        assert not torch.allclose(cache[resid_pre(layer)][real], cache[resid_pre(layer + 1)][real], atol=1e-2)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_padded_batch_equals_prompts_run_alone(family, tiny_model_dirs):
    bridge, tokenizer = load_bridge(tiny_model_dirs[family])
    ids, real = padded_batch(tokenizer)
    states = states_for_layers(tuple(range(bridge.cfg.n_layers)))
    batched = capture_states(bridge, ids, real, states, batch_size=3, label="batched")
    for row in range(len(PROMPTS)):
        length = int(real[row].sum())
        alone = capture_states(bridge, ids[row : row + 1, :length], real[row : row + 1, :length], states,
                               batch_size=1, label="alone")
        torch.testing.assert_close(batched.values[:, row, :length], alone.values[:, 0], atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(batched.values[:, row, length:]) == 0
