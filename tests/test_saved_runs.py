"""Saved runs read back (load_run), several runs in one DataFrame (concat_runs), summary filters, repr."""

import pandas as pd
import pytest
import torch

import lens_compare
from lens_compare.errors import LensCompareError
from lens_compare.run import main

PROMPTS = ["the quick brown fox jumps over the lazy dog", "hello world"]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DEV_MODE", raising=False)


def _cli_run(perturbed_llama, out, *extra, capsys) -> dict:
    base, sft, _ = perturbed_llama
    args = ["--base", str(base), "--sft", str(sft), "--out", str(out), "-q", *extra]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    assert main(args) == 0
    return {p.name.split(".", 1)[1] if ".tokens." in p.name else p.suffix: p
            for p in map(__import__("pathlib").Path, capsys.readouterr().out.split())}


@pytest.fixture
def in_memory(perturbed_llama):
    base, sft, _ = perturbed_llama
    return lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, keep_residuals=True)


@pytest.mark.parametrize("fmt", ["--parquet", "--csv"])
def test_load_run_restores_summary_table_and_residuals(fmt, perturbed_llama, in_memory, tmp_path, capsys):
    written = _cli_run(perturbed_llama, tmp_path / "out", fmt, "--save-residuals", capsys=capsys)
    loaded = lens_compare.load_run(written[".json"])
    pd.testing.assert_frame_equal(loaded.summary(), in_memory.summary())
    pd.testing.assert_frame_equal(loaded.to_dataframe(), in_memory.to_dataframe(), check_categorical=False)
    assert loaded.to_dataframe().dtypes.equals(in_memory.to_dataframe().dtypes)
    for ours, theirs in zip(loaded.residuals, in_memory.residuals, strict=True):
        assert ours.states == theirs.states and torch.equal(ours.values, theirs.values)
    assert loaded.to_dict()["resid_post"] == in_memory.to_dict()["resid_post"]


def test_load_run_without_a_token_table_gives_the_summary_and_says_what_is_missing(perturbed_llama, in_memory,
                                                                                  tmp_path, capsys):
    written = _cli_run(perturbed_llama, tmp_path / "out", capsys=capsys)
    loaded = lens_compare.load_run(written[".json"])
    assert loaded.metrics is None and loaded.residuals is None
    pd.testing.assert_frame_equal(loaded.summary(), in_memory.summary())
    with pytest.raises(LensCompareError, match="no token table beside its JSON; re-run it with --parquet or --csv"):
        loaded.to_dataframe()
    with pytest.raises(LensCompareError, match="no run at"):
        lens_compare.load_run(tmp_path / "nothing.json")
    # A file that is not a run is named as given (not as a .json beside it).
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    with pytest.raises(LensCompareError, match=r"'.*pyproject\.toml' is not a lens_compare run"):
        lens_compare.load_run(tmp_path / "pyproject.toml")
    assert lens_compare.load_run(written[".json"].with_suffix("")).summary().equals(loaded.summary())  # the stem


def test_concat_runs_adds_pair_and_run_columns(perturbed_llama, in_memory, tmp_path, capsys):
    from dataclasses import replace

    base, _, _ = perturbed_llama
    same = lens_compare.compare(base=str(base), sft=str(base), prompts=PROMPTS)
    # Ad-hoc runs are all pair "custom": a run column tells them apart.
    assert list(lens_compare.concat_runs([in_memory, same]).columns[:2]) == ["pair", "run"]
    other = replace(same, provenance=replace(same.provenance, pair="identity"))
    two = lens_compare.concat_runs([in_memory, other])
    assert "run" not in two and list(two.columns[:1]) == ["pair"]
    assert set(two["pair"]) == {"custom", "identity"}
    assert len(two) == len(in_memory.summary()) + len(other.summary())
    written = _cli_run(perturbed_llama, tmp_path / "out", "--csv", capsys=capsys)
    twice = lens_compare.concat_runs([in_memory, written[".json"]], table="tokens")
    assert list(twice.columns[:2]) == ["pair", "run"] and set(twice["run"]) == {0, 1}
    assert len(twice) == 2 * len(in_memory.to_dataframe())


def test_summary_filters_and_shares_dtypes_with_the_token_table(in_memory):
    cosine = in_memory.summary(hook="resid_post", metric="cosine")
    assert set(cosine["metric"]) == {"cosine"} and set(cosine["hook"]) == {"resid_post"}
    assert len(cosine) == 2 * len(in_memory.layers)  # rest and first
    rest = in_memory.summary(hook="resid_post", metric="cosine", positions="rest")
    assert list(rest["layer"]) == list(in_memory.layers)
    summary, tokens = in_memory.summary(), in_memory.to_dataframe()
    for column in ("hook", "layer", "metric"):
        assert summary[column].dtype == tokens[column].dtype, column
    with pytest.raises(LensCompareError, match=r"summary\(metric='cosin'\): expected one of"):
        in_memory.summary(metric="cosin")


def test_repr_is_a_few_lines_without_tensors(in_memory):
    text = repr(in_memory)
    assert len(text.splitlines()) <= 6 and len(text) < 600
    assert "tensor" not in text and "3 layers (0..2), 2 prompts" in text
    assert "largest relative_l2" in text
