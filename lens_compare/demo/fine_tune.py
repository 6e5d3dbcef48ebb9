"""Build once, and report, the smollm2-ft demo pair's SFT side: SmolLM2-135M-Instruct fine-tuned offline.

lens_compare fine-tunes it itself, so that a first run shows a real fine-tuning signature.

    python -m lens_compare.demo_ft            # build it (first use, a few minutes) and print its report
    python -m lens_compare.demo_ft --plot loss.png

The recipe (``Recipe``): supervised fine-tuning on ``lens_compare.demo.task``'s questions
in the model's own chat template (its default system prompt, the user's question, the
assistant's one-word answer), with the loss on the answer tokens and the closing
``<|im_end|>`` only. Full fine-tuning of every block and the final norm; the token
embedding (tied to the unembedding) stays frozen. AdamW, linear warm-up then cosine
decay, a fixed seed, float32 on the CPU.

Before and after training the model answers the held-out questions greedily; the report
gives exact-match and contains accuracy per task family, and the loss at every step.
The checkpoint (safetensors, config, tokenizer, ``demo_ft.json`` with the report) is
written once into ``$LENS_COMPARE_CACHE/demo/`` and reused; the model reference
``demo:smollm2-ft`` names it (``lens_compare.models.demo_recipes``), and a run that uses it
builds it first (``demo_checkpoint``), once its checks have passed.
"""

import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.demo.task import FAMILIES, Example, grade, split_examples
from lens_compare.models.demo_recipes import RECIPE_VERSION, Recipe, checkpoint_path
from lens_compare.util.versions import package_version

logger = logging.getLogger("lens_compare")

REPORT_FILE = "demo_ft.json"
IGNORE = -100


def demo_checkpoint(recipe: Recipe) -> Path:
    """``recipe``'s checkpoint directory, trained and written on first use."""
    from lens_compare.util.cache import build_once
    from lens_compare.util.progress import quiet_library_bars

    quiet_library_bars()
    target = checkpoint_path(recipe)
    if not target.is_dir():
        logger.info("building the %s demo checkpoint once (fine-tuning on this machine, a few minutes) into %s",
                    recipe.name, target)
    return build_once(target, lambda tmp: build(recipe, tmp))


# ---------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Batch:
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    # The token each position predicts, IGNORE where no loss is taken (prompt, padding).
    targets: Int[Tensor, "batch pos"]


def prompt_text(tokenizer, question: str) -> str:
    """The chat-template text up to the assistant's answer (the model's default system prompt)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)


def sft_tokens(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(token ids, targets) of one example: the prompt, then the answer and end-of-turn token.

    ``targets[i]`` is the id position ``i`` must predict: the next answer token, IGNORE
    everywhere else, so the loss covers the answer and the end-of-turn token only.
    """
    prompt = tokenizer(prompt_text(tokenizer, example.question), add_special_tokens=False).input_ids
    answer = tokenizer(example.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ids = prompt + answer
    targets = [IGNORE] * len(ids)
    for offset, token in enumerate(answer):
        targets[len(prompt) + offset - 1] = token
    return ids, targets


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-padded tensors of several ``sft_tokens`` rows."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (ids, target) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        targets[row, : len(ids)] = torch.tensor(target)
        mask[row, : len(ids)] = True
    return Batch(input_ids, mask, targets)


def answer_loss(model, batch: Batch) -> Float[Tensor, ""]:
    """Mean cross-entropy over the answer tokens; the unembedding runs on those positions only."""
    hidden: Float[Tensor, "batch pos d_model"] = model.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask.long()).last_hidden_state
    scored = batch.targets != IGNORE
    logits: Float[Tensor, "answer vocab"] = model.get_output_embeddings()(hidden[scored])
    return torch.nn.functional.cross_entropy(logits.float(), batch.targets[scored])


def learning_rate(recipe: Recipe, step: int) -> float:
    """Linear warm-up to ``learning_rate``, then cosine decay to ``final_lr_fraction`` of it."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    floor = recipe.final_lr_fraction
    return recipe.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


# ---------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Accuracy:
    """Held-out accuracy per family and overall (fractions of the questions)."""

    exact: dict[str, float]
    contains: dict[str, float]
    replies: list[dict[str, Any]] = field(repr=False)

    @property
    def exact_overall(self) -> float:
        return _overall(self.replies, "exact")

    @property
    def contains_overall(self) -> float:
        return _overall(self.replies, "contains")


def _overall(replies: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in replies) / len(replies) if replies else float("nan")


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = 30) -> Accuracy:
    """Greedy answers to ``examples``, graded by ``demo_task.grade``."""
    model.eval()
    replies: list[dict[str, Any]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer(prompt_text(tokenizer, e.question), add_special_tokens=False).input_ids for e in chunk]
        width = max(map(len, prompts))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Left padding, so every prompt's next token is generated at the same column.
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad)
        for example, row in zip(chunk, out[:, width:], strict=True):
            reply = tokenizer.decode(row, skip_special_tokens=True)
            exact, contains = grade(reply, example.answer)
            replies.append({**asdict(example), "reply": reply, "exact": exact, "contains": contains})
    by_family = {f: [r for r in replies if r["family"] == f] for f in FAMILIES}
    return Accuracy(
        exact={f: _overall(rows, "exact") for f, rows in by_family.items() if rows},
        contains={f: _overall(rows, "contains") for f, rows in by_family.items() if rows},
        replies=replies,
    )


# ---------------------------------------------------------------------------- training


def build(recipe: Recipe, directory: Path) -> dict[str, Any]:
    """Fine-tune ``recipe.source`` and write the checkpoint and its report into ``directory``."""
    from lens_compare.models.load_options import LoadOptions
    from lens_compare.models.loading import load_config, load_hf_model, load_tokenizer, resolve_ref
    from lens_compare.util.progress import progress_bar

    torch.manual_seed(recipe.seed)
    ref = resolve_ref(recipe.source)
    tokenizer = load_tokenizer(ref)
    model = load_hf_model(ref, load_config(ref), LoadOptions("float32", "cpu"))
    train, heldout = split_examples(recipe.seed, recipe.heldout_per_family, recipe.train_size)

    started = time.perf_counter()
    before = evaluate(model, tokenizer, heldout, recipe.max_new_tokens)
    evaluated = time.perf_counter()

    model.get_input_embeddings().weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=recipe.learning_rate, betas=(0.9, 0.95), weight_decay=0.0)
    order = random.Random(recipe.seed + 1)
    rows = [sft_tokens(tokenizer, e) for e in train]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    losses: list[float] = []
    model.train()
    with progress_bar(total=recipe.steps, desc=f"fine-tuning {recipe.name}", unit="step", dynamic_ncols=True) as bar:
        for step in range(recipe.steps):
            batch = collate([rows[order.randrange(len(rows))] for _ in range(recipe.batch_size)], pad)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, step)
            loss = answer_loss(model, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    model.eval()
    del optimizer
    tuned = time.perf_counter()
    after = evaluate(model, tokenizer, heldout, recipe.max_new_tokens)
    finished = time.perf_counter()

    report = {
        "recipe": asdict(recipe),
        "recipe_version": RECIPE_VERSION,
        "cache_key": recipe.cache_key(),
        "trained_parameters": sum(p.numel() for p in trained),
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "losses": losses,
        "seconds": {"eval_before": evaluated - started, "train": tuned - evaluated, "eval_after": finished - tuned},
        "torch_threads": torch.get_num_threads(),
        # The same recipe on other versions or thread counts may round differently.
        "versions": {"torch": torch.__version__, "transformers": package_version("transformers")},
        "before": _accuracy_dict(before),
        "after": _accuracy_dict(after),
    }
    model.config._attn_implementation = None
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _accuracy_dict(accuracy: Accuracy) -> dict[str, Any]:
    return {"exact": accuracy.exact, "contains": accuracy.contains, "exact_overall": accuracy.exact_overall,
            "contains_overall": accuracy.contains_overall, "replies": accuracy.replies}


def load_report(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / REPORT_FILE).read_text())


def format_report(report: dict[str, Any], every: int = 10) -> str:
    """The report as a few lines: the loss curve sampled every ``every`` steps, then accuracy."""
    recipe, losses = report["recipe"], report["losses"]
    seconds = report["seconds"]
    lines = [
        f"{recipe['name']}: {recipe['source']} fine-tuned for {recipe['steps']} steps of {recipe['batch_size']} "
        f"examples (lr {recipe['learning_rate']:g}, seed {recipe['seed']}), {report['trained_parameters']:,} "
        f"parameters trained; {sum(seconds.values()):.0f} s on {report['torch_threads']} thread(s) "
        f"(training {seconds['train']:.0f} s)",
        "loss on answer tokens, by step:",
        "  " + ("  ".join(f"{step}: {losses[step]:.3f}" for step in sorted({*range(0, len(losses), every),
                                                                            len(losses) - 1}))
                if losses else "no training step"),
        f"held-out accuracy ({report['heldout_examples']} questions never trained on; greedy replies of at most "
        f"{recipe['max_new_tokens']} tokens), before -> after:",
        f"  {'family':<10} {'exact':>15} {'contains':>17}",
    ]
    for family in [*report["before"]["exact"], "overall"]:
        def pick(side: str, key: str, family: str = family) -> float:
            return report[side][f"{key}_overall"] if family == "overall" else report[side][key][family]

        lines.append(f"  {family:<10} {pick('before', 'exact'):>6.0%} -> {pick('after', 'exact'):>4.0%}   "
                     f"{pick('before', 'contains'):>8.0%} -> {pick('after', 'contains'):>4.0%}")
    return "\n".join(lines)
