"""Token ids both models see: identity check, --tokens, chat template, untrained rows."""

import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lens_compare
from lens_compare.engines import loaded as model_loading
from lens_compare.errors import TokenizationError
from lens_compare.models.tokens import tokenize_prompts, untrained_token_ids


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dirs):
    return AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])


@pytest.fixture(scope="session")
def mismatched_dir(tiny_model_dirs, tmp_path_factory):
    """The llama checkpoint with a tokenizer that splits 'brown' differently."""
    dst = tmp_path_factory.mktemp("mismatch") / "llama"
    shutil.copytree(tiny_model_dirs["llama"], dst)
    other = AutoTokenizer.from_pretrained(dst)
    other.add_tokens(["brown"])
    other.save_pretrained(dst)
    return dst


def test_identical_tokenizers_give_one_set_of_ids(tokenizer):
    tokenized = tokenize_prompts(("hello world", "the fox"), tokenizer, tokenizer)
    assert tokenized.token_ids[0] == tuple(tokenizer("hello world")["input_ids"])
    ids, mask = tokenized.padded(pad_id=3)
    assert ids.shape == mask.shape == (2, max(tokenized.lengths))
    assert mask.sum().item() == sum(tokenized.lengths)


def test_tokenizer_mismatch_names_the_first_differing_position(tokenizer, mismatched_dir):
    other = AutoTokenizer.from_pretrained(mismatched_dir)
    with pytest.raises(TokenizationError, match=r"prompt 1 at token position \d+"):
        tokenize_prompts(("hello world", "the quick brown fox"), tokenizer, other)


def test_tokens_truncates_refuses_or_fills(tokenizer):
    long = "the quick brown fox jumps over the lazy dog " * 3
    cut = tokenize_prompts((long,), tokenizer, tokenizer, n_tokens=10)
    assert cut.lengths == (10,)
    assert cut.token_ids[0] == tuple(tokenizer(long)["input_ids"][:10])
    with pytest.raises(TokenizationError, match="shorter than --tokens 50"):
        tokenize_prompts(("hello",), tokenizer, tokenizer, n_tokens=50)
    filled = tokenize_prompts(("hello",), tokenizer, tokenizer, n_tokens=50, filler_text="the lazy dog")
    assert filled.lengths == (50,)
    assert filled.texts[0].startswith("hello the lazy dog")


def test_chat_template_wraps_with_the_sft_template_once(tokenizer):
    tokenized = tokenize_prompts(("hello world",), tokenizer, tokenizer, chat_template="sft")
    expected_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello world"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenized.texts == (expected_text,)
    ids = tokenized.token_ids[0]
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


def test_untrained_rows_are_found_from_the_embedding():
    g = torch.Generator().manual_seed(0)
    embedding = torch.randn(100, 16, generator=g)
    embedding[7] = 0.0
    embedding[9] *= 0.01
    found = untrained_token_ids(embedding, {1, 7, 9, 50}, chunk=13)
    assert set(found) == {7, 9}
    assert found[7] == 0.0


def test_untrained_template_tokens_are_warned_about_and_marked(tiny_model_dirs, tmp_path, caplog):
    """Like Llama-3.1 base: the chat template's special tokens have untrained embedding rows."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    user_id = tokenizer.convert_tokens_to_ids("<|user|>")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    with torch.no_grad():
        model.get_input_embeddings().weight[user_id] = 0.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="lens_compare"):
        result = lens_compare.compare(base=str(tmp_path), sft=str(tiny_model_dirs["llama"]),
                                      prompts=["hello world"], chat_template="sft")
    assert "<|user|>" in caplog.text
    assert [t["id"] for t in result.provenance["untrained_base_tokens"]] == [user_id]
    assert result.provenance["texts"][0].startswith("<s><|user|>\nhello world")
    frame = result.to_dataframe()
    marked = frame[frame["base_untrained"]]
    assert set(marked["token_id"]) == {user_id} and len(marked) > 0


def test_too_long_prompt_fails_before_any_weights_load(tiny_model_dirs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(model_loading, "load_hf_model", refuse)
    directory = str(tiny_model_dirs["llama"])
    with pytest.raises(TokenizationError, match="context of 256 tokens"):
        lens_compare.compare(base=directory, sft=directory, prompts=["the fox " * 200])


def test_filler_extension_is_linear_in_the_token_count(tokenizer, monkeypatch):
    """A handful of encodes whatever N (it was one encode of the whole text per repetition)."""
    from lens_compare.models import tokens

    calls = []
    original = tokens._encode

    def counting(tok, text, add_special):
        calls.append(len(text))
        return original(tok, text, add_special)

    monkeypatch.setattr(tokens, "_encode", counting)
    for n in (50, 5000):
        calls.clear()
        out = tokenize_prompts(("Hello",), tokenizer, tokenizer, n_tokens=n, filler_text="the quick brown fox")
        assert len(out.token_ids[0]) == n
        assert len(calls) <= 6, f"{len(calls)} encodes for {n} tokens"


def test_filler_that_adds_no_tokens_is_refused(tokenizer, monkeypatch):
    """A tokenizer that drops the filler entirely (stripped whitespace, say) must not loop forever."""
    from lens_compare.models import tokens

    monkeypatch.setattr(tokens, "_encode", lambda tok, text, add_special: [1, 2, 3])
    with pytest.raises(TokenizationError, match="adds no tokens"):
        tokenize_prompts(("Hello",), tokenizer, tokenizer, n_tokens=50, filler_text="   ")


def test_tokens_beyond_the_context_fail_before_extending(tiny_model_dirs, monkeypatch):
    from lens_compare.pipeline import prepare

    def refuse(*args, **kwargs):
        raise AssertionError("prompts were extended before the context was checked")

    monkeypatch.setattr(prepare, "tokenize_prompts", refuse)
    directory = str(tiny_model_dirs["llama"])
    with pytest.raises(TokenizationError, match=r"--tokens 100000 is longer than the base model .* context of 256"):
        lens_compare.compare(base=directory, sft=directory, prompts=["the fox"], tokens=100000,
                             filler_text="the quick brown fox")


def test_readable_tokens_show_the_text_with_visible_whitespace(tokenizer):
    """Byte-level BPE (Ġ, Ċ) and SentencePiece (▁, byte fallback) tokens read as their text, with
    spaces and newlines visible; special tokens stay as they are."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lens_compare.models.tokens import readable_tokens

    ids = tokenizer("the quick\nfox", add_special_tokens=True)["input_ids"]
    raw = tokenizer.convert_ids_to_tokens(ids)
    assert raw[0] == "<s>" and "Ġqu" in raw and "Ċ" in raw
    readable = readable_tokens(tokenizer, ids)
    assert readable[0] == "<s>" and readable[raw.index("Ġqu")] == "␣qu" and readable[raw.index("Ċ")] == "↵"
    assert "".join(readable[1:]) == "the␣quick↵fox"
    # A SentencePiece-style tokenizer: ▁ marks a space, unknown characters fall back to bytes.
    spm = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    spm.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    spm.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    spm.train_from_iterator(["The capital of France is Paris."], trainer=trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>"] + [f"<0x{i:02X}>" for i in range(256)], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=spm, bos_token="<s>", unk_token="<unk>")
    ids = fast("France\tis", add_special_tokens=False)["input_ids"]
    assert "<0x09>" in fast.convert_ids_to_tokens(ids)
    assert "".join(readable_tokens(fast, ids)) == "␣France⇥is"
