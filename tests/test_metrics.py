"""Every metric against an independent NumPy (float64) reference."""

import math

import numpy as np
import pytest
import torch

from lens_compare.metrics.aggregate import layer_records, token_mask
from lens_compare.metrics.per_token import token_metrics
from lens_compare.metrics.residual import (
    METRIC_NAMES,
    cosine,
    cross_model,
    depth_step,
    l2_norm,
    masked_stats,
    relative_l2,
)
from lens_compare.metrics.states import ResidualStates
from lens_compare.util.hooks import HOOK_KINDS, states_for_layers


def np_cos(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture
def pair_tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, 16, generator=g)
    sft = base + 0.3 * torch.randn(5, 7, 16, generator=g)
    return base, sft


def test_elementwise_metrics_match_numpy(pair_tensors):
    base, sft = pair_tensors
    b, s = base.double().numpy(), sft.double().numpy()
    cm = cross_model(base, sft)
    nb, ns = np.linalg.norm(b, axis=-1), np.linalg.norm(s, axis=-1)
    np.testing.assert_allclose(cm.cosine.numpy(), np_cos(b, s), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cm.norm_delta.numpy(), ns - nb, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cm.norm_ratio.numpy(), ns / nb, rtol=1e-5)
    np.testing.assert_allclose(cm.relative_l2.numpy(), np.linalg.norm(s - b, axis=-1) / nb, rtol=1e-5)
    np.testing.assert_allclose(cm.base_norm.numpy(), nb, rtol=1e-5)
    np.testing.assert_allclose(l2_norm(sft).numpy(), ns, rtol=1e-5)
    np.testing.assert_allclose(cosine(base, sft).numpy(), np_cos(b, s), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(relative_l2(base, sft).numpy(), cm.relative_l2.numpy())
    step = depth_step(base, sft)
    np.testing.assert_allclose(step.cosine_prev.numpy(), np_cos(s, b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(step.norm_delta.numpy(), ns - nb, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_metrics_are_float32_whatever_the_input_dtype(pair_tensors, dtype):
    base, sft = (t.to(dtype) for t in pair_tensors)
    cm = cross_model(base, sft)
    assert cm.cosine.dtype == torch.float32
    reference = np_cos(base.double().numpy(), sft.double().numpy())
    np.testing.assert_allclose(cm.cosine.numpy(), reference, rtol=1e-5, atol=1e-6)


def test_identical_inputs_are_exact(pair_tensors):
    base, _ = pair_tensors
    for dtype in (torch.float32, torch.bfloat16):
        cm = cross_model(base.to(dtype), base.to(dtype).clone())
        assert torch.allclose(cm.cosine, torch.ones_like(cm.cosine), atol=1e-6, rtol=0)
        assert torch.equal(cm.norm_delta, torch.zeros_like(cm.norm_delta))
        assert torch.equal(cm.relative_l2, torch.zeros_like(cm.relative_l2))
        assert torch.equal(cm.norm_ratio, torch.ones_like(cm.norm_ratio))


def test_zero_vector_cosine_is_nan_not_zero():
    assert math.isnan(cosine(torch.zeros(1, 4), torch.ones(1, 4)).item())


def test_masked_stats_match_numpy():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(4, 50, generator=g)
    mask = torch.rand(4, 50, generator=g) > 0.3
    mask[3] = False
    got = masked_stats(values, mask).numpy()
    for row in range(3):
        selected = values[row][mask[row]].double().numpy()
        expected = [selected.mean(), selected.std(ddof=0), selected.min(), selected.max()]
        np.testing.assert_allclose(got[row], expected, rtol=1e-12, atol=1e-12)
    assert np.isnan(got[3]).all()


def _states(values: torch.Tensor, states: tuple[int, ...], n_layers: int) -> ResidualStates:
    return ResidualStates(n_layers=n_layers, states=states, values=values)


@pytest.mark.parametrize("layers", [(0, 1, 2, 3), (1, 2, 3), (0, 2, 3)])
@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_token_metrics_and_aggregates_match_numpy(layers):
    n_layers, n_prompts, width, d_model = 4, 3, 6, 8
    states = states_for_layers(layers)
    g = torch.Generator().manual_seed(2)
    base_v = torch.randn(len(states), n_prompts, width, d_model, generator=g)
    sft_v = base_v + 0.5 * torch.randn(len(states), n_prompts, width, d_model, generator=g)
    lengths = [6, 4, 1]
    real = torch.zeros(n_prompts, width, dtype=torch.bool)
    for row, length in enumerate(lengths):
        real[row, :length] = True
    base_v[:, ~real] = 0
    sft_v[:, ~real] = 0
    metrics = token_metrics(_states(base_v, states, n_layers), _states(sft_v, states, n_layers), layers)

    def state_of(kind, layer):
        return base_v[states.index(layer if kind == "resid_pre" else layer + 1)].double().numpy(), \
            sft_v[states.index(layer if kind == "resid_pre" else layer + 1)].double().numpy()

    np_real = real.numpy()
    for positions in ("rest", "all", "first"):
        mask = token_mask(real, positions).numpy()
        records = layer_records(metrics, layers, torch.from_numpy(mask))
        for kind in HOOK_KINDS:
            for row, layer in enumerate(layers):
                b, s = state_of(kind, layer)
                ref = {
                    "cosine": np_cos(b, s),
                    "norm_delta": np.linalg.norm(s, axis=-1) - np.linalg.norm(b, axis=-1),
                    "norm_ratio": np.linalg.norm(s, axis=-1) / np.linalg.norm(b, axis=-1),
                    "relative_l2": np.linalg.norm(s - b, axis=-1) / np.linalg.norm(b, axis=-1),
                    "base_norm": np.linalg.norm(b, axis=-1),
                    "sft_norm": np.linalg.norm(s, axis=-1),
                }
                if layer - 1 in layers:
                    pb, ps = state_of(kind, layer - 1)
                    ref["base_cosine_prev"] = np_cos(b, pb)
                    ref["sft_cosine_prev"] = np_cos(s, ps)
                    ref["base_norm_delta"] = np.linalg.norm(b, axis=-1) - np.linalg.norm(pb, axis=-1)
                    ref["sft_norm_delta"] = np.linalg.norm(s, axis=-1) - np.linalg.norm(ps, axis=-1)
                record = records[kind][row]
                assert record["layer"] == layer
                assert set(record) == {"layer", *METRIC_NAMES}
                for name in METRIC_NAMES:
                    if name not in ref:
                        assert record[name] is None, (kind, layer, name)
                        assert torch.isnan(metrics[kind][name][row]).all()
                        continue
                    # per-token values at real positions
                    np.testing.assert_allclose(
                        metrics[kind][name][row].numpy()[np_real], ref[name][np_real], rtol=1e-4, atol=1e-5
                    )
                    selected = ref[name][mask]
                    expected = [selected.mean(), selected.std(), selected.min(), selected.max()]
                    got = [record[name][k] for k in ("mean", "std", "min", "max")]
                    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_padding_never_enters_an_aggregate():
    layers = (0, 1)
    states = states_for_layers(layers)
    base_v = torch.ones(len(states), 2, 3, 4)
    sft_v = torch.ones(len(states), 2, 3, 4)
    real = torch.tensor([[True, True, True], [True, True, False]])
    # garbage at the padded position would change every statistic if it leaked in
    sft_v[:, 1, 2] = -100.0
    metrics = token_metrics(_states(base_v, states, 2), _states(sft_v, states, 2), layers)
    records = layer_records(metrics, layers, token_mask(real, "all"))
    assert records["resid_pre"][0]["cosine"] == {"mean": 1.0, "std": 0.0, "min": 1.0, "max": 1.0}


def test_shape_annotations_are_enforced_under_pytest():
    """pyproject's --jaxtyping-packages turns the signatures' shapes into runtime checks."""
    from jaxtyping import TypeCheckError

    with pytest.raises(TypeCheckError):
        masked_stats(torch.zeros(3, 4), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cosine_of_identical_and_opposite_vectors_is_exact_and_bounded(dtype):
    """The sanity pair's claim: identical states give cosine exactly 1 (not 1.0000001)."""
    from lens_compare.metrics.residual import cosine, cross_model

    generator = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 50, 576, generator=generator) * 40).to(dtype)
    assert torch.all(cross_model(x, x).cosine == 1.0)
    assert torch.all(cosine(x, x) == 1.0)
    assert torch.all(cosine(x, -x) == -1.0)
    y = x + (1e-3 * torch.randn(x.shape, generator=generator)).to(dtype)
    values = cross_model(x, y).cosine
    assert torch.all((values <= 1.0) & (values >= -1.0))
    assert torch.isnan(cosine(torch.zeros(1, 8), torch.ones(1, 8))).all()
