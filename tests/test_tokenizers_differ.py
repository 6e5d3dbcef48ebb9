"""Tokenizers that differ: an SFT tokenizer with added chat tokens, refused by default with the
tokens named, fed to both models with ``--tokenizer sft`` where the base model has rows for its ids.

Two pairs: the real SmolLM2 with three added special tokens and its embedding resized to 49,155
rows (the SFT ids 49152..49154 are beyond the base model's 49,152 rows: refused either way), and a
tiny llama whose embedding is padded beyond its tokenizer (400 rows for 384 tokens, as Qwen2.5 has
151,936 rows for 151,665 tokens), whose SFT sibling's added tokens (ids 384..386) the base model
has rows for, never trained on them.
"""

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lens_compare
from lens_compare.config import RunConfig, fingerprinted
from lens_compare.engines import loaded as model_loading
from lens_compare.errors import TokenizationError
from lens_compare.models.tokens import readable_tokens, tokenize_prompts
from lens_compare.run import main
from tests.fixtures.chat_tokens import ADDED_TOKENS
from tests.fixtures.tiny_models import build_tiny_model, perturb_block

PROMPTS = ["What is 23 + 45?", "Name a prime number."]
PADDED_ROWS = 400  # the tiny tokenizer has 384 tokens


@pytest.fixture(scope="module")
def padded_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny llama with 400 embedding rows for its 384 tokens, and its SFT sibling (block 1
    perturbed) whose tokenizer added <|tool|>, <|think|>, <|answer|> as ids 384..386, with a chat
    template that writes them; both models' rows for those ids are the base model's padding."""
    from tests.fixtures.chat_tokens import with_chat_tokens

    root = tmp_path_factory.mktemp("padded")
    base = build_tiny_model("llama", root / "base", config_overrides={"vocab_size": PADDED_ROWS})
    tuned = perturb_block(base, root / "tuned", 1)
    return base, with_chat_tokens(tuned, root / "sft")


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(model_loading, "load_hf_model", lambda *a, **k: pytest.fail("a model was loaded"))


def _tokenizers(pair) -> tuple:
    return tuple(AutoTokenizer.from_pretrained(side) for side in pair)


def test_differing_tokenizers_are_refused_naming_the_tokens_and_offering_the_sft_tokenizer(padded_pair, no_loading):
    base_tokenizer, _ = _tokenizers(padded_pair)
    pieces = base_tokenizer("<|tool|>", add_special_tokens=False)["input_ids"]
    words = ", ".join(repr(word) for word in readable_tokens(base_tokenizer, pieces))
    with pytest.raises(TokenizationError) as refused:
        lens_compare.compare(base=str(padded_pair[0]), sft=str(padded_pair[1]), prompts=PROMPTS, chat_template="sft")
    assert str(refused.value) == (
        "the base and SFT tokenizers disagree on prompt 0 at token position 0: the SFT tokenizer reads 1 token, "
        f"'<|tool|>' (id 384) where the base tokenizer reads {len(pieces)} tokens, {words} "
        f"(ids {', '.join(map(str, pieces))}); both models must see the same ids. Pass --tokenizer sft to feed the "
        "SFT tokenizer's ids to both models: the base model has an embedding row for each (those its tokenizer "
        "lacks were never trained on these tokens)"
    )


def test_a_disagreement_inside_a_prompt_names_both_spans(padded_pair):
    """Where the tokenizers part mid-prompt, each side's tokens up to where they read the same text."""
    base_tokenizer, sft_tokenizer = _tokenizers(padded_pair)
    with pytest.raises(TokenizationError, match=r"on prompt 1 at token position [1-9]\d*: the SFT tokenizer reads "
                                                r"1 token, '<\|answer\|>' \(id 386\) where the base tokenizer "
                                                r"reads \d+ tokens, '<', '\|', "):
        tokenize_prompts(("hello", "the <|answer|> is"), base_tokenizer, sft_tokenizer)
    # Without offsets (a slow tokenizer), one token each side.
    from lens_compare.models import tokens

    assert tokens._differing_spans("x", False, (object(), object()), ((1, 2, 3), (1, 4)), 1) == (2, 2)


def test_sft_ids_beyond_the_base_rows_are_refused_naming_them(padded_pair):
    base_tokenizer, sft_tokenizer = _tokenizers(padded_pair)
    rows = {"base": 384, "sft": PADDED_ROWS}
    beyond = ("'<|tool|>' (id 384), '<|think|>' (id 385), '<|answer|>' (id 386) are beyond the base model's 384 "
              "embedding rows (ids 0..383)")
    with pytest.raises(TokenizationError) as refused:
        tokenize_prompts(tuple(PROMPTS), base_tokenizer, sft_tokenizer, chat_template="sft", tokenizer="sft",
                         vocab_sizes=rows)
    assert str(refused.value) == (
        f"--tokenizer sft: the SFT tokenizer's {beyond}, so that model cannot read them and this pair cannot be "
        "compared on these prompts; the SFT chat template writes them (--chat-template none leaves the template out)"
    )
    # Written in the prompt itself: no word about the template.
    with pytest.raises(TokenizationError, match=r"'<\|tool\|>' \(id 384\) is beyond .* on these prompts$"):
        tokenize_prompts(("<|tool|> hello",), base_tokenizer, sft_tokenizer, tokenizer="sft", vocab_sizes=rows)
    # The default refusal says --tokenizer sft would not help either.
    with pytest.raises(TokenizationError, match=rf"--tokenizer sft, which feeds the SFT tokenizer's ids to both "
                                                rf"models, cannot help here: {re.escape(beyond)}$"):
        tokenize_prompts(tuple(PROMPTS), base_tokenizer, sft_tokenizer, chat_template="sft", vocab_sizes=rows)


def test_the_sft_tokenizer_names_fills_and_classes_the_ids(padded_pair):
    """--tokenizer sft: the SFT tokenizer's ids, its filler, its token classes; the ids the base
    tokenizer lacks are kept."""
    base_tokenizer, sft_tokenizer = _tokenizers(padded_pair)
    tokenized = tokenize_prompts(tuple(PROMPTS), base_tokenizer, sft_tokenizer, chat_template="sft", tokenizer="sft",
                                 vocab_sizes={"base": PADDED_ROWS, "sft": PADDED_ROWS})
    content = sft_tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert tokenized.token_ids[0] == (384, *content, 385, *sft_tokenizer("\n")["input_ids"][-1:], 386)
    assert tokenized.tokenizer == "sft" and tokenized.base_lacks == (384, 385, 386)
    flags = dict(zip(tokenized.token_ids[0], tokenized.content[0], strict=True))
    assert not any(flags[token] for token in (384, 385, 386)) and sum(tokenized.content[0]) > 3
    filled = tokenize_prompts(("<|tool|> hello",), base_tokenizer, sft_tokenizer, tokenizer="sft", n_tokens=12,
                              filler_text="the lazy dog")
    assert filled.lengths == (12,) and 384 in filled.token_ids[0]
    assert filled.token_ids[0] == tuple(sft_tokenizer(filled.texts[0])["input_ids"][:12])


def test_ids_the_base_tokenizer_names_otherwise_are_lacking(tiny_model_dirs, tmp_path):
    """An SFT tokenizer that renamed a token the base tokenizer has (<|system|> as <|tool|>, as recipes
    reuse Llama-3's reserved tokens): the id is the same, the token is not the base's."""
    other = tmp_path / "renamed"
    shutil.copytree(tiny_model_dirs["llama"], other)
    index = json.loads((other / "tokenizer.json").read_text())["model"]["vocab"]["<|system|>"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (other / name).is_file():
            (other / name).write_text((other / name).read_text().replace("<|system|>", "<|tool|>"))
    base_tokenizer, sft_tokenizer = _tokenizers((tiny_model_dirs["llama"], other))
    tokenized = tokenize_prompts(("<|tool|> hello",), base_tokenizer, sft_tokenizer, tokenizer="sft")
    assert index in tokenized.token_ids[0] and tokenized.base_lacks == (index,)
    with pytest.raises(TokenizationError, match=rf"reads 1 token, '<\|tool\|>' \(id {index}\) where the base"):
        tokenize_prompts(("<|tool|> hello",), base_tokenizer, sft_tokenizer)


@pytest.mark.parametrize("strategy", ["resident", "stream"])
def test_the_sft_tokenizer_feeds_both_models_its_ids(padded_pair, strategy, caplog):
    """Each model's captured states equal its HF forward on the SFT tokenizer's ids; the ids the base
    tokenizer lacks are flagged as untrained base rows (their norms are ordinary: padding rows)."""
    base, sft = padded_pair
    with caplog.at_level(logging.WARNING, logger="lens_compare"):
        result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS, chat_template="sft",
                                      tokenizer="sft", strategy=strategy, keep_residuals=True, bootstrap=0)
    _, sft_tokenizer = _tokenizers(padded_pair)
    ids = result.tokens.token_ids
    for prompt, row_ids in zip(PROMPTS, ids, strict=True):
        text = sft_tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
        assert row_ids == tuple(sft_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert ids[0][0] == 384 and 386 in ids[0]
    assert all(states.states == (0, 1, 2, 3) for states in result.residuals)
    for side, states in zip((base, sft), result.residuals, strict=True):
        model = AutoModelForCausalLM.from_pretrained(side, attn_implementation="eager")
        # HF's last hidden state is after the final norm; the last captured state is its input.
        last: dict[str, torch.Tensor] = {}
        model.model.norm.register_forward_pre_hook(lambda _module, args, seen=last: seen.update(x=args[0]))
        for row, row_ids in enumerate(ids):
            with torch.no_grad():
                hidden = model(torch.tensor([row_ids]), output_hidden_states=True).hidden_states
            reference = (*hidden[:-1], last["x"])
            for index, state in enumerate(states.states):
                torch.testing.assert_close(states.values[index, row, : len(row_ids)], reference[state][0])
    # Same rows for the added ids in both models, so every state before the perturbed block agrees.
    assert result.to_dict()["resid_pre"][1]["cosine"]["min"] == pytest.approx(1.0)
    provenance = result.provenance
    assert provenance["tokenizer"] == "sft" and provenance["config"]["tokenizer"] == "sft"
    assert [(t["id"], t["token"], t["in_base_tokenizer"]) for t in provenance["untrained_base_tokens"]] == [
        (384 + i, token, False) for i, token in enumerate(ADDED_TOKENS)]
    assert all(t["norm_over_median"] > 0.5 for t in provenance["untrained_base_tokens"])
    assert "--tokenizer sft fed the base model ids its own tokenizer lacks: '<|tool|>' (id 384, row norm" in caplog.text
    frame = result.to_dataframe()
    marked = frame[frame["base_untrained"]]
    assert set(marked["token_id"]) == {384, 385, 386} and set(marked["token"]) == set(ADDED_TOKENS)
    assert result.token_strings[0][0] == "<|tool|>" == readable_tokens(sft_tokenizer, [384])[0]
    assert set(result.summary()["positions"]) >= {"template", "content"}


def test_the_smollm2_pair_is_refused_either_way_before_loading(smollm2_safetensors, smollm2_with_chat_tokens,
                                                               no_loading):
    """The SFT tokenizer's ids 49152..49154 are beyond the base model's 49,152 rows: refused by default
    (naming the tokens, and why --tokenizer sft cannot help) and with --tokenizer sft."""
    pair = {"base": str(smollm2_safetensors), "sft": str(smollm2_with_chat_tokens)}
    beyond = ("'<|tool|>' (id 49152), '<|think|>' (id 49153), '<|answer|>' (id 49154) are beyond the base model's "
              "49,152 embedding rows (ids 0..49151)")
    with pytest.raises(TokenizationError) as refused:
        lens_compare.compare(**pair, prompts=PROMPTS, chat_template="sft")
    assert str(refused.value) == (
        "the base and SFT tokenizers disagree on prompt 0 at token position 0: the SFT tokenizer reads 1 token, "
        "'<|tool|>' (id 49152) where the base tokenizer reads 5 tokens, '<', '|', 'tool', '|', '>' "
        "(ids 44, 108, 19324, 108, 46); both models must see the same ids. --tokenizer sft, which feeds the SFT "
        f"tokenizer's ids to both models, cannot help here: {beyond}"
    )
    with pytest.raises(TokenizationError) as refused:
        lens_compare.compare(**pair, prompts=PROMPTS, chat_template="sft", tokenizer="sft")
    assert str(refused.value) == (
        f"--tokenizer sft: the SFT tokenizer's {beyond}, so that model cannot read them and this pair cannot be "
        "compared on these prompts; the SFT chat template writes them (--chat-template none leaves the template out)"
    )


def test_the_cli_takes_tokenizer_sft_and_refuses_a_bad_value_in_one_line(padded_pair, tmp_path, capsys):
    base, sft = padded_pair
    common = ["--base", str(base), "--sft", str(sft), "--prompt", PROMPTS[0], "--chat-template", "sft",
              "--out", str(tmp_path / "out"), "-q", "--bootstrap", "0"]
    assert main(common) == 1
    err = capsys.readouterr().err
    assert err.startswith("lens_compare: error: the base and SFT tokenizers disagree on prompt 0")
    assert "Pass --tokenizer sft" in err and len(err.strip().splitlines()) == 1
    assert main([*common, "--tokenizer", "sft"]) == 0
    written = capsys.readouterr().out.split()
    path = next(Path(p) for p in written if p.endswith(".json"))
    document = json.loads(path.read_text())
    assert document["provenance"]["tokenizer"] == "sft"
    assert document["provenance"]["token_ids"][0][0] == 384
    saved = lens_compare.load_run(path)
    assert saved.tokens.tokenizer == "sft" and saved.tokens.base_lacks == (384, 385, 386)
    assert main([*common, "--tokenizer", "gpt2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lens_compare: error: ") and "--tokenizer" in err and "'gpt2'" in err
    assert len(err.strip().splitlines()) == 1


def test_the_tokenizer_is_part_of_the_run_fingerprint(tiny_model_dirs, tmp_path, capsys):
    """Each tokenizer gets a run folder of its own, even where both give the same ids."""
    assert fingerprinted(RunConfig(tokenizer="sft"))["tokenizer"] == "sft"
    model = str(tiny_model_dirs["llama"])
    for choice in ("base", "sft"):
        assert main(["--base", model, "--sft", model, "--prompt", "hello world", "--tokenizer", choice,
                     "--out", str(tmp_path), "-q", "--bootstrap", "0"]) == 0
    capsys.readouterr()
    assert len(list((tmp_path / "runs").iterdir())) == 2
