"""Bootstrap intervals of the per-layer means: the resampling against a NumPy loop, coverage on
synthetic data with a known mean, and the intervals in results, JSON and tables."""

import numpy as np
import pytest
import torch

from lens_compare.analyses import ANALYSES
from lens_compare.metrics.bootstrap import Bootstrap, interval, resample_counts, resampled_means
from lens_compare.results.result import SCHEMA_VERSION

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world", "a b c d e f"]


def test_resampled_means_equal_a_numpy_loop_over_explicit_draws():
    rng = np.random.default_rng(0)
    sums, counts = rng.normal(size=(3, 7)), rng.integers(1, 9, size=(3, 7)).astype(float)
    indices = rng.integers(0, 7, size=(50, 7))
    draws = np.stack([np.bincount(row, minlength=7) for row in indices]).astype(float)
    got = resampled_means(torch.tensor(sums), torch.tensor(counts), torch.tensor(draws)).numpy()
    for b, chosen in enumerate(indices):
        for row in range(3):
            assert got[row, b] == pytest.approx(sums[row, chosen].sum() / counts[row, chosen].sum(), rel=1e-12)


def test_resample_counts_are_seeded_draws_with_replacement():
    counts = resample_counts(9, Bootstrap(400, seed=3))
    assert counts.shape == (400, 9) and torch.all(counts.sum(dim=1) == 9)
    assert torch.equal(counts, resample_counts(9, Bootstrap(400, seed=3)))
    assert not torch.equal(counts, resample_counts(9, Bootstrap(400, seed=4)))
    # Each unit is drawn 1 time per resample on average.
    assert counts.mean().item() == pytest.approx(1.0)


def _clustered(seed: int, n_prompts: int, mean: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens of a prompt share a random prompt effect (so they are not independent)."""
    rng = np.random.default_rng(seed)
    width = 20
    lengths = rng.integers(5, width + 1, size=n_prompts)
    effect = rng.normal(0.0, 0.7, size=(n_prompts, 1))
    values = mean + effect + rng.normal(0.0, 1.0, size=(n_prompts, width))
    mask = np.arange(width)[None, :] < lengths[:, None]
    return torch.tensor(values[None]), torch.tensor(mask[None])


def test_prompt_intervals_cover_the_known_mean_about_95_percent_of_the_time():
    hits = []
    for seed in range(300):
        values, mask = _clustered(seed, n_prompts=40, mean=1.5)
        low, high = interval(values, mask, Bootstrap(1000, seed=seed))
        hits.append(bool(low[0] <= 1.5 <= high[0]))
    coverage = float(np.mean(hits))
    assert 0.90 <= coverage <= 0.985, coverage


def test_one_prompt_resamples_its_tokens_and_covers_about_95_percent():
    hits = []
    for seed in range(300):
        rng = np.random.default_rng(1000 + seed)
        values = torch.tensor(rng.exponential(2.0, size=(1, 1, 150)))  # skewed, mean 2
        low, high = interval(values, torch.ones_like(values, dtype=torch.bool), Bootstrap(1000, seed=seed))
        hits.append(bool(low[0] <= 2.0 <= high[0]))
    assert 0.90 <= float(np.mean(hits)) <= 0.985


def test_rows_without_tokens_and_constant_rows():
    values = torch.zeros((2, 3, 4), dtype=torch.float64)
    mask = torch.ones((2, 3, 4), dtype=torch.bool)
    mask[1] = False
    low, high = interval(values, mask, Bootstrap(200))
    assert low[0] == 0 and high[0] == 0 and torch.isnan(low[1]) and torch.isnan(high[1])


def test_results_carry_intervals_in_records_json_and_summary(perturbed_llama):
    import lens_compare

    base, sft, block = perturbed_llama
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, seed=7)
    document = result.to_dict()
    assert document["schema_version"] == SCHEMA_VERSION
    assert document["aggregation"]["interval"]["resampled"].startswith("prompts")
    assert document["aggregation"]["interval"]["seed"] == 7 and result.provenance["bootstrap"]["seed"] == 7
    for record in document["resid_post"]:
        stats = record["relative_l2"]
        assert list(stats)[:3] == ["mean", "ci_low", "ci_high"]
        assert stats["ci_low"] <= stats["ci_high"]
        if record["layer"] < block:  # identical before the perturbed block: a point interval at 0
            assert stats["ci_low"] == stats["ci_high"] == 0.0
        else:
            assert stats["ci_low"] < stats["ci_high"]
    summary = result.summary(hook="resid_post", metric="relative_l2", positions="rest")
    assert list(summary.columns[4:]) == ["mean", "ci_low", "ci_high", "std", "min", "max"]
    # Same seed, same interval; another seed, another one (with 3 prompts there are only 10
    # distinct resamples, and both seeds find the same percentiles: use more prompts).
    many = [f"{word} and the number {n}" for n, word in enumerate(["fox", "dog", "cat", "owl", "eel", "ant", "bee"])]
    seeded = lens_compare.compare(base=str(base), sft=str(sft), prompts=many, seed=7).to_dict()["resid_post"]
    again = lens_compare.compare(base=str(base), sft=str(sft), prompts=many, seed=7).to_dict()["resid_post"]
    other = lens_compare.compare(base=str(base), sft=str(sft), prompts=many, seed=8).to_dict()["resid_post"]
    assert again == seeded and other != seeded
    assert [r["relative_l2"]["mean"] for r in other] == [r["relative_l2"]["mean"] for r in seeded]

    one = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:1], bootstrap=300)
    assert one.to_dict()["aggregation"]["interval"]["resampled"].startswith("tokens within the one prompt")
    none = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, bootstrap=0)
    assert none.to_dict()["aggregation"]["interval"] is None
    assert "ci_low" not in none.to_dict()["resid_post"][-1]["cosine"]
    assert none.summary()["ci_low"].isna().all()


def test_negative_bootstrap_is_refused():
    from lens_compare.config import RunConfig
    from lens_compare.errors import ConfigError

    with pytest.raises(ConfigError, match="bootstrap: must be >= 0"):
        RunConfig.from_dict({"bootstrap": -1})


def test_plots_draw_the_interval_as_a_band(perturbed_llama):
    import lens_compare
    from lens_compare import plots
    from lens_compare.errors import LensCompareError

    base, sft, _ = perturbed_llama
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, bootstrap=200)
    ax = plots.layer_curves([result], "norm_ratio", hooks=("resid_post",), band="ci").axes[0]
    assert "95% bootstrap CI" in ax.get_title()
    band = ax.collections[-1].get_paths()[0].vertices[:, 1]
    records = result.layer_records()["resid_post"]
    assert min(band) == pytest.approx(min(r["norm_ratio"]["ci_low"] for r in records))
    assert max(band) == pytest.approx(max(r["norm_ratio"]["ci_high"] for r in records))
    bare = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, bootstrap=0)
    with pytest.raises(LensCompareError, match="no bootstrap intervals"):
        plots.layer_curves([bare], "cosine", band="ci")


def test_load_run_reads_schema_1_runs_without_intervals_and_recomputes_the_same_ones(perturbed_llama, tmp_path):
    import json

    import lens_compare
    from lens_compare.run import main

    base, sft, _ = perturbed_llama
    assert main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--csv", "--seed", "5", "--out", str(tmp_path), "-q"]) == 0
    path = next(tmp_path.glob("*.json"))
    written = json.loads(path.read_text())
    loaded = lens_compare.load_run(path)  # from the token table, with the run's own seed
    assert loaded.to_dict()["resid_post"] == written["resid_post"]

    # A schema 1 run: no intervals, no bootstrap provenance, no analyses.
    analyses = {a.name for a in ANALYSES}
    old = {k: v for k, v in written.items() if k not in analyses}
    old.update(schema_version=1, first_token={k: v for k, v in written["first_token"].items() if k not in analyses})
    old["provenance"] = {k: v for k, v in written["provenance"].items() if k != "bootstrap"}
    for records in (old["resid_pre"], old["resid_post"], *old["first_token"].values()):
        for record in records:
            for stats in record.values():
                if isinstance(stats, dict):
                    stats.pop("ci_low"), stats.pop("ci_high")
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps(old))
    summary = lens_compare.load_run(legacy).summary()
    assert summary["ci_low"].isna().all() and summary["mean"].notna().any()
