"""The difference lens's top positions: the ranking's ties and zeros, a float64 NumPy reference from
the saved residuals, a direction planted at one token's positions found there, three shards ranking
exactly what one does, every engine ranking the same, the JSON, DataFrame and saved runs, and the
option. (Resuming between the last shard and the readings, shards of separate comparisons and a
sweep's prefixes: tests/test_difference_lens.py, beside the readings.)"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

import lens_compare
from lens_compare import RunConfig
from lens_compare.analyses.difference_positions import Ranking, unit_differences
from lens_compare.engines.store import Kind, MemoryStore
from lens_compare.errors import ConfigError, LensCompareError
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.tokens import readable_tokens
from lens_compare.pipeline.comparison import Comparison, run_comparison
from lens_compare.pipeline.execution import Execution
from lens_compare.results.result import DIFFERENCE_POSITIONS_COLUMNS
from lens_compare.results.saved import load_run
from lens_compare.run import main
from tests.fixtures.ranks import ranked_positions_difference
from tests.fixtures.tiny_models import build_tiny_model, planted_token_pair
from tests.fixtures.token_classes import numpy_masks

PROMPTS = ("the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding",
           "two plus two is four", "the train leaves the station at seven", "water boils at one hundred degrees")
# The cosines come from float16 unit vectors: each entry rounded to within 2^-11 of its size, so a
# cosine moves by at most 2^-11 (Cauchy-Schwarz); float32's sums add about 1e-6.
COSINE_ATOL = 2.0**-11 + 1e-5


def _cpu(schedule: str):
    options = LoadOptions("float32", "cpu")
    return lambda facts: Execution(schedule, schedule, {"base": options, "sft": options})


def test_the_ranking_breaks_ties_by_prompt_and_position_and_skips_zero_differences():
    real = torch.ones(2, 4, dtype=torch.bool)
    base = torch.zeros(2, 4, 3)
    sft = torch.tensor([[[0., 0, 0], [2, 0, 0], [0, 1, 0], [1, 0, 0]],
                        [[5, 5, 5], [3, 0, 0], [0, 0, 0], [-1, 0, 0]]])
    spill = unit_differences(base, sft, real, first_prompt=10)
    assert spill["units"].dtype == torch.float16
    torch.testing.assert_close(spill["norms"], torch.tensor([0, 2, 1, 1, 75**0.5, 3, 0, 1]))
    assert spill["prompt"].tolist() == [10] * 4 + [11] * 4 and spill["position"].tolist() == [0, 1, 2, 3] * 2
    members = torch.ones(2, 8, dtype=torch.bool)
    members[1, 4:] = False  # the second group covers the first prompt only
    deltas = torch.tensor([[1.0, 0, 0], [0, 0, 0]])  # a group whose δ is 0 lists nothing
    whole = Ranking(deltas, n=4)
    whole.add(spill, members)
    halves = Ranking(deltas, n=4)
    for part in (slice(0, 4), slice(4, 8)):  # the same tokens in two shards
        halves.add({key: value[part] for key, value in spill.items()}, members[:, part])
    assert whole.top() == halves.top()
    first, second = whole.top()
    # Equal cosines (1.0 at 10/1, 10/3 and 11/1) rank by prompt, then position; the zeros (10/0, 11/2) not at all.
    assert [(prompt, position) for _, prompt, position, _ in first] == [(10, 1), (10, 3), (11, 1), (11, 0)]
    assert [value for value, *_ in first] == pytest.approx([1.0, 1.0, 1.0, 3**-0.5], abs=2**-11)
    assert [ratio for *_, ratio in first][:3] == [2.0, 1.0, 3.0], "|d_t| / |δ|"
    assert second == []


def test_positions_against_numpy_from_the_saved_residuals(tiny_model_dirs, tmp_path):
    base_dir = tiny_model_dirs["llama"]
    sft_dir = build_tiny_model("llama", tmp_path / "other", seed=1)
    n = 7
    result = lens_compare.compare(base=str(base_dir), sft=str(sft_dir), prompts=PROMPTS[:4], bootstrap=0,
                                  logit_lens="all", chat_template="sft", difference_lens_first=3,
                                  difference_lens_positions=n, shard_size=2, keep_residuals=True, check_memory=False)
    assert result.provenance["shards"]["count"] == 2
    states = {role: (r.states, r.values.double().numpy()) for role, r in zip(("base", "sft"), result.residuals,
                                                                            strict=True)}
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    shared = result.tokens.shared_prefix
    assert shared > 1, "the chat template's system prompt: every prompt's first tokens"
    expected = []
    for positions, mask in numpy_masks(result, 3).items():
        prompts, places = np.nonzero(mask)  # prompt-then-position order
        once = ~((prompts > 0) & (places < shared))  # the shared prefix ranked once, in prompt 0
        for layer in result.layers:
            resid = {role: values[list(found).index(layer + 1)] for role, (found, values) in states.items()}
            differences = resid["sft"][mask] - resid["base"][mask]
            delta = differences.mean(axis=0)
            norms = np.linalg.norm(differences, axis=1)
            cosines = differences @ delta / (np.where(norms > 0, norms, 1.0) * np.linalg.norm(delta))
            order = [i for i in np.lexsort((places, prompts, -cosines)) if norms[i] > 0 and once[i]][:n]
            ids = [result.tokens.token_ids[prompts[i]][places[i]] for i in order]
            expected += [{"layer": layer, "positions": positions, "rank": rank, "prompt": int(prompts[i]),
                          "position": int(places[i]), "token_id": token_id, "token": token,
                          "cosine": float(cosines[i]), "norm_ratio": float(norms[i] / np.linalg.norm(delta))}
                         for rank, (i, token_id, token) in enumerate(zip(order, ids, readable_tokens(tokenizer, ids),
                                                                         strict=True), 1)]
    found = result.difference_positions_records
    assert {r["positions"] for r in found} == {"rest", "first_content", "template"}
    assert len(found) == len(expected) == len(result.layers) * 3 * n
    assert ranked_positions_difference(expected, found, 0.0, COSINE_ATOL) is None
    worst = max(abs(a["cosine"] - b["cosine"]) for a, b in zip(expected, found, strict=True))
    assert worst < 2**-12, "rounding errors mostly cancel: far inside the bound (8.5e-5 here)"


def test_a_direction_planted_at_one_tokens_positions_is_found_there(tmp_path):
    token = 263  # " t": three times in the prompts, twice among their first five content tokens
    generator = torch.Generator().manual_seed(0)
    base, sft = planted_token_pair(tmp_path, token, lambda model: torch.randn(model.config.hidden_size,
                                                                              generator=generator), size=100.0)
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, bootstrap=0, logit_lens="all",
                                  difference_lens_positions=5, check_memory=False)
    planted = {(prompt, position) for prompt, ids in enumerate(result.tokens.token_ids)
               for position, found in enumerate(ids) if found == token and position > 0}
    assert len(planted) == 3
    frame = result.difference_positions()
    assert set(frame["layer"]) == {0, 1, 2, 3}, "the embedding differs: every layer's stream does"
    for (layer, positions), ranked in frame.groupby(["layer", "positions"], observed=True):
        ranked = ranked.sort_values("rank")
        m = 3 if positions == "rest" else 2
        head, tail = ranked.iloc[:m], ranked.iloc[m:]
        top = set(zip(head["prompt"], head["position"], strict=True))
        assert top <= planted and len(top) == m, (layer, positions, ranked)
        assert (head["cosine"] > 0.95).all() and (tail["cosine"] < 0.5).all(), ranked
        assert (head["norm_ratio"] > 10).all() and (head["token"] == head["token"].iloc[0]).all()


@pytest.fixture(scope="module")
def reference(perturbed_llama) -> list:
    base, sft, _ = perturbed_llama
    return run_comparison(_config(base, sft), preflight=_cpu("resident")).difference_positions_records


def _config(base, sft, **extra) -> RunConfig:
    return RunConfig(base_model=str(base), sft_model=str(sft), prompts=PROMPTS, batch_size=2, bootstrap=0,
                     logit_lens="all", **extra)


def test_three_shards_rank_exactly_what_one_does(perturbed_llama, reference):
    base, sft, _ = perturbed_llama
    sharded = run_comparison(_config(base, sft, shard_size=2), preflight=_cpu("resident"))
    assert sharded.provenance["shards"]["count"] == 3
    assert sharded.difference_positions_records == reference
    assert {r["layer"] for r in reference} == {1, 2}, "block 0 is the same in both models: no difference to rank"
    assert len(reference) == 2 * 2 * 5


def test_repeated_prompts_tie_and_rank_by_prompt_however_they_are_sharded(perturbed_llama):
    """A repeated prompt's tokens have the very same differences: exact ties, listed in prompt order,
    whichever shard each copy is in and however many tokens its shard has."""
    base, sft, _ = perturbed_llama
    prompts = (PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[0])
    found = {size: run_comparison(_config(base, sft, shard_size=size, difference_lens_positions=6)
                                  .replace(prompts=prompts, batch_size=1),
                                  preflight=_cpu("resident")).difference_positions_records
             for size in (1, 3)}
    assert found[1] == found[3]
    rest = [r for r in found[1] if r["positions"] == "rest" and r["layer"] == 2]
    assert [r["prompt"] for r in rest] == [0, 1, 3, 0, 1, 3]
    assert rest[0]["cosine"] == rest[1]["cosine"] == rest[2]["cosine"] and rest[0]["position"] == rest[2]["position"]


@pytest.mark.parametrize("schedule,extra", [("sequential", {}), ("stream", {}), ("stream", {"shard_size": 4})])
def test_every_engine_ranks_the_resident_positions(perturbed_llama, reference, schedule, extra):
    base, sft, _ = perturbed_llama
    store = MemoryStore()
    comparison = Comparison(_config(base, sft, **extra), preflight=_cpu(schedule))
    comparison.run(store)
    assert not store.keys(Kind.DIFFERENCE_UNITS), "the spill is dropped once the readings are stored"
    found = comparison.assemble(store).difference_positions_records
    assert ranked_positions_difference(reference, found, 1e-4, 1e-5) is None


def test_a_process_that_finds_the_spill_gone_leaves_the_readings_to_the_one_that_stored_them(perturbed_llama):
    """Two processes that both finish a shard last both rank: the first to store the readings drops
    the spill, and the other, finding it gone, leaves the readings stored; a spill missing with no
    readings stored is an error, not an empty list."""
    base, sft, _ = perturbed_llama
    config = _config(base, sft).replace(prompts=PROMPTS[:2])
    theirs = {"records": [], "prefixes": {}, "positions": [], "prefix_positions": {}}
    store = MemoryStore()
    get = store.get

    def other_process_first(kind, **parts):
        if kind is Kind.DIFFERENCE_UNITS and not store.has(Kind.DIFFERENCE_LENS):
            store.put(Kind.DIFFERENCE_LENS, theirs)
            store.drop(Kind.DIFFERENCE_UNITS)
        return get(kind, **parts)

    store.get = other_process_first
    Comparison(config, preflight=_cpu("resident")).run(store)
    assert store.get(Kind.DIFFERENCE_LENS) is theirs

    lost = MemoryStore()
    put = lost.put
    lost.put = lambda kind, value, **parts: None if kind is Kind.DIFFERENCE_UNITS else put(kind, value, **parts)
    with pytest.raises(KeyError, match="difference_units"):
        Comparison(config, preflight=_cpu("resident")).run(lost)


def test_json_dataframe_saved_runs_and_the_option(perturbed_llama, tmp_path, capsys):
    base, sft, _ = perturbed_llama
    assert main(["--base", str(base), "--sft", str(sft), *(a for p in PROMPTS[:3] for a in ("--prompt", p)),
                 "--logit-lens", "all", "--difference-lens-positions", "3", "--bootstrap", "0",
                 "--out", str(tmp_path), "-q"]) == 0
    path = next(Path(line) for line in capsys.readouterr().out.split() if line.endswith(".json"))
    document = json.loads(path.read_text())
    assert document["schema_version"] == 7 and document["provenance"]["difference_lens"]["top_positions"] == 3
    records = document["difference_positions"]
    assert records and all(list(r) == list(DIFFERENCE_POSITIONS_COLUMNS) for r in records)
    assert [r["rank"] for r in records[:3]] == [1, 2, 3] and records[0]["cosine"] >= records[1]["cosine"]
    first = records[0]
    assert first["token_id"] == document["provenance"]["token_ids"][first["prompt"]][first["position"]]
    assert not list(tmp_path.glob("runs/*/difference_units")), "the run folder keeps no spill"

    frame = load_run(path).difference_positions()
    assert list(frame.columns) == list(DIFFERENCE_POSITIONS_COLUMNS) and len(frame) == len(records)
    assert frame["cosine"].tolist() == [r["cosine"] for r in records]
    assert frame.dtypes["prompt"] == "int64" and list(frame["positions"].cat.categories)[:2] == ["rest",
                                                                                                "first_content"]
    # A run saved before the positions (schema 6) reads back; difference_positions() says why it has none.
    old = json.loads(json.dumps(document))
    old["schema_version"] = 6
    del old["difference_positions"], old["provenance"]["difference_lens"]["top_positions"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    saved = load_run(tmp_path / "old.json")
    assert saved.difference_lens_records == document["difference_lens"]
    with pytest.raises(LensCompareError, match="schema_version < 7"):
        saved.difference_positions()

    store = MemoryStore()
    off = Comparison(_config(base, sft, difference_lens_positions=0), preflight=_cpu("resident"))
    original = store.put
    kinds = []
    store.put = lambda kind, value, **parts: kinds.append(kind) or original(kind, value, **parts)
    off.run(store)
    result = off.assemble(store)
    assert Kind.DIFFERENCE_UNITS not in kinds, "0: no spill at all"
    assert result.to_dict()["difference_positions"] is None and result.difference_lens_records
    with pytest.raises(LensCompareError, match="ranked no positions"):
        result.difference_positions()
    with pytest.raises(ConfigError, match="difference_lens_positions: must be >= 0"):
        RunConfig.from_dict({"difference_lens_positions": -1})
