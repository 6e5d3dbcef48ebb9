"""Layer alignment (CKA): both estimators against NumPy references written apart from the torch
code, the sanity pair's diagonal, every engine, the saved run, and the plan's refusal."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import lens_compare
from lens_compare import RunConfig
from lens_compare.analyses.cka import cka_matrices
from lens_compare.errors import HardwareError
from lens_compare.pipeline.comparison import run_comparison
from lens_compare.run import main

PROMPTS = ["the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding"]


def _numpy_linear(x: np.ndarray, y: np.ndarray) -> float:
    """Feature-space form: ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))


def _numpy_hsic_unbiased(k: np.ndarray, m: np.ndarray) -> float:
    """Song et al. (2012), eq. 5 (their K and L as k and m), on uncentred Gram matrices, spelled out."""
    n = k.shape[0]
    k, m = k.copy(), m.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(m, 0)
    one = np.ones(n)
    return (np.trace(k @ m) + (one @ k @ one) * (one @ m @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ k @ m @ one)) / (n * (n - 3))


def _numpy_debiased(x: np.ndarray, y: np.ndarray) -> float:
    k, m = x @ x.T, y @ y.T
    return _numpy_hsic_unbiased(k, m) / np.sqrt(_numpy_hsic_unbiased(k, k) * _numpy_hsic_unbiased(m, m))


def _random_layers(seed: int, n: int = 40, d: int = 12, layers: int = 3):
    generator = np.random.default_rng(seed)
    base = [generator.normal(size=(n, d)) + generator.normal(size=d) * 5 for _ in range(layers)]
    rotation, _ = np.linalg.qr(generator.normal(size=(d, d)))
    sft = [base[0] @ rotation * 3.0 + 7.0,                       # planted: rotated, scaled, shifted
           base[1] + 0.5 * generator.normal(size=(n, d)),       # planted: noisy copy
           generator.normal(size=(n, d))]                       # unrelated
    return base, sft


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_estimators_against_numpy(seed):
    base, sft = _random_layers(seed)
    features = {"base": base, "sft": sft}
    found = cka_matrices(lambda role, state: torch.tensor(features[role][state]), (0, 1, 2))
    for i in range(3):
        for j in range(3):
            assert found["linear"][i, j].item() == pytest.approx(_numpy_linear(base[i], sft[j]), rel=1e-9)
            assert found["linear_debiased"][i, j].item() == pytest.approx(_numpy_debiased(base[i], sft[j]),
                                                                          rel=1e-7, abs=1e-10)
    # Invariant to rotation, isotropic scaling and shifts: the planted pair is exactly aligned.
    assert found["linear"][0, 0].item() == pytest.approx(1.0, abs=1e-12)
    assert found["linear_debiased"][0, 0].item() == pytest.approx(1.0, abs=1e-12)
    # The debiased estimator removes the small-sample bias: near 0 for unrelated features.
    assert abs(found["linear_debiased"][2, 2].item()) < found["linear"][2, 2].item()
    assert found["linear"][1, 1] > found["linear"][1, 2]


def _config(base, sft, **extra):
    return RunConfig.from_dict({"base_model": str(base), "sft_model": str(sft), "prompts": PROMPTS,
                                "batch_size": 2, "bootstrap": 0, "cka": True, **extra})


def test_sanity_pair_diagonal_is_one(tiny_model_dirs):
    directory = tiny_model_dirs["qwen2"]
    result = run_comparison(_config(directory, directory))
    cka = result.to_dict()["cka"]
    assert cka["hook"] == "resid_post" and cka["layers"] == [0, 1, 2]
    assert cka["n_tokens"] == int(result.real_tokens.sum()) - len(PROMPTS)
    for name in ("linear", "linear_debiased"):
        assert np.allclose(np.diag(cka[name]), 1.0, atol=1e-9)
    assert result.residuals is None, "states were kept for CKA, not returned"


@pytest.mark.parametrize("extra", [{"strategy": "sequential"}, {"strategy": "stream"},
                                   {"strategy": "resident", "shard_size": 1},
                                   {"strategy": "sequential", "shard_size": 2}])  # an uneven last shard
def test_every_engine_gives_the_resident_matrix(perturbed_llama, extra):
    base, sft, block = perturbed_llama
    reference = run_comparison(_config(base, sft, strategy="resident")).cka
    other = run_comparison(_config(base, sft, **extra)).cka
    for name in ("linear", "linear_debiased"):
        np.testing.assert_allclose(np.array(other[name]), np.array(reference[name]), atol=1e-6)
    assert reference["linear"][0][0] == pytest.approx(1.0, abs=1e-9)  # before the perturbed block
    assert reference["linear"][block][block] < 1 - 1e-4


def test_cli_writes_cka_keeps_no_states_and_reads_it_back(perturbed_llama, tmp_path, capsys):
    base, sft, _ = perturbed_llama
    assert main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt", PROMPTS[2],
                 "--cka", "--out", str(tmp_path), "-q"]) == 0
    capsys.readouterr()
    path = next(tmp_path.glob("*.json"))
    written = json.loads(path.read_text())
    assert len(written["cka"]["linear"]) == 3 and lens_compare.load_run(path).cka == written["cka"]
    folder = next((tmp_path / "runs").iterdir())
    assert not list(folder.rglob("*.safetensors")) or not list((folder / "states").glob("*")), \
        "the states kept for CKA are removed once it is computed"
    assert not list(tmp_path.glob("*.safetensors"))


def test_plan_refuses_cka_it_cannot_hold():
    from lens_compare.pipeline.preflight import check_cka_memory, machine_for

    machine = replace(machine_for("cpu", ()), host_ram_gib=1.0)
    check_cka_memory(2000, 4, machine)  # 0.19 GiB: fine
    with pytest.raises(HardwareError, match=r"--cka over 20,000 tokens needs 17.9 GiB .* grows with their square"):
        check_cka_memory(20000, 4, machine)
