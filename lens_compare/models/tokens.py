"""Turn prompts into one set of token ids that both models will see.

The base tokenizer tokenizes; the SFT tokenizer must produce the identical ids
for every prompt, or the run stops before any model is loaded.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.errors import TokenizationError
from lens_compare.metrics.residual import l2_norm
from lens_compare.models.token_classes import class_flags

ChatTemplate = Literal["none", "sft"]
CHAT_TEMPLATES: tuple[ChatTemplate, ...] = ("none", "sft")

# A base embedding row whose norm is below this fraction of the median row norm is
# treated as never trained (Llama-3.1 base: <|start_header_id|>, <|eot_id|>, ...).
UNTRAINED_NORM_RATIO = 0.05


@dataclass(frozen=True)
class TokenizedPrompts:
    """The prompts as fed to both models: one row of ids per prompt, no padding."""

    prompts: tuple[str, ...]
    texts: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]
    chat_template: ChatTemplate
    # With a chat template: per token, whether it is the user's content (else the template's);
    # None without a template (see lens_compare.models.token_classes).
    content: tuple[tuple[bool, ...], ...] | None = None

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(len(ids) for ids in self.token_ids)

    @property
    def shared_prefix(self) -> int:
        """How many leading tokens every prompt shares (0 with one prompt): a chat template's system
        prompt, say. A causal model computes the same states there in every prompt, so a ranking of
        tokens lists that prefix once (prompt 0's) and each prompt's own tokens apart."""
        if len(self.token_ids) < 2:
            return 0
        length = 0
        for column in zip(*self.token_ids, strict=False):
            if len(set(column)) > 1:
                break
            length += 1
        return length

    def padded(self, pad_id: int) -> tuple[Int[Tensor, "prompt pos"], Bool[Tensor, "prompt pos"]]:
        """Right-padded ids and the mask of real tokens (right padding keeps positions aligned)."""
        width = max(self.lengths)
        ids = torch.full((len(self.token_ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(self.token_ids), width), dtype=torch.bool)
        for row, row_ids in enumerate(self.token_ids):
            ids[row, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
            mask[row, : len(row_ids)] = True
        return ids, mask


def apply_chat_template(prompts: tuple[str, ...], tokenizer, owner: str) -> tuple[str, ...]:
    """Wrap each prompt as a user turn plus the generation prompt, in ``tokenizer``'s template."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizationError(
            f"--chat-template sft: the {owner} tokenizer has no chat template; "
            "use --chat-template none or a tokenizer that ships one"
        )
    return tuple(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        for prompt in prompts
    )


def _encode(tokenizer, text: str, add_special_tokens: bool) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _first_difference(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    for position, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return position
    return min(len(a), len(b))


def _extend_with_filler(prompt: str, filler: str, n_tokens: int, tokenizer) -> str:
    """``prompt`` followed by as many `` filler`` as reach ``n_tokens`` tokens.

    Linear in ``n_tokens``: the repetitions are counted from the filler's own token count,
    then the text is encoded again only to top up where tokens merged across the joins
    (re-encoding after every single repetition was quadratic: 11 minutes at 100,000 tokens).
    """
    piece = f" {filler}"
    per_piece = max(1, len(_encode(tokenizer, piece, False)))
    text = prompt
    have = len(_encode(tokenizer, text, True))
    while have < n_tokens:
        text += piece * math.ceil((n_tokens - have) / per_piece)
        before, have = have, len(_encode(tokenizer, text, True))
        if have <= before:
            raise TokenizationError(f"filler_text {filler!r} adds no tokens; give a filler with words in it")
    return text


def tokenize_prompts(
    prompts: tuple[str, ...],
    base_tokenizer,
    sft_tokenizer,
    *,
    chat_template: ChatTemplate = "none",
    n_tokens: int | None = None,
    filler_text: str | None = None,
) -> TokenizedPrompts:
    """Tokenize with the base tokenizer and require identical ids from the SFT tokenizer.

    ``n_tokens`` makes every prompt exactly that long: longer prompts are truncated,
    shorter ones are extended with ``filler_text`` (repeated) or refused.
    """
    if not prompts:
        raise TokenizationError("no prompts given: pass --prompt TEXT or --prompts-file FILE")
    if chat_template not in CHAT_TEMPLATES:
        raise TokenizationError(f"chat template {chat_template!r} is not one of {CHAT_TEMPLATES}")
    if n_tokens is not None and n_tokens < 1:
        raise TokenizationError(f"--tokens must be a positive integer, got {n_tokens}")
    contents = prompts
    if n_tokens is not None and filler_text:
        contents = tuple(
            _extend_with_filler(prompt, filler_text, n_tokens, base_tokenizer) for prompt in prompts
        )
    templated = chat_template == "sft"
    texts = apply_chat_template(contents, sft_tokenizer, "SFT") if templated else contents
    # A chat template writes its own BOS; adding special tokens again would double it.
    add_special = not templated
    all_ids = []
    for index, text in enumerate(texts):
        base_ids = _encode(base_tokenizer, text, add_special)
        sft_ids = _encode(sft_tokenizer, text, add_special)
        if base_ids != sft_ids:
            position = _first_difference(base_ids, sft_ids)
            base_tok = base_ids[position] if position < len(base_ids) else "<end>"
            sft_tok = sft_ids[position] if position < len(sft_ids) else "<end>"
            raise TokenizationError(
                f"the base and SFT tokenizers disagree on prompt {index} at token position "
                f"{position} (base id {base_tok}, SFT id {sft_tok}); both models must see the "
                "same ids, so this pair cannot be compared on this prompt"
            )
        if n_tokens is not None:
            if len(base_ids) < n_tokens:
                raise TokenizationError(
                    f"prompt {index} is {len(base_ids)} tokens, shorter than --tokens {n_tokens}; "
                    "give a longer prompt, or pad it with text: --filler-text TEXT (filler_text in a config file, "
                    "compare(filler_text=...))"
                )
            base_ids = base_ids[:n_tokens]
        if not base_ids:
            raise TokenizationError(f"prompt {index} tokenizes to no tokens at all")
        all_ids.append(base_ids)
    content = class_flags(texts, contents, all_ids, base_tokenizer) if templated else None
    return TokenizedPrompts(
        prompts=prompts, texts=texts, token_ids=tuple(all_ids), chat_template=chat_template, content=content
    )


def check_context(tokenized: TokenizedPrompts, context: int | None, label: str) -> None:
    """Refuse prompts longer than the model's context before any weights are loaded."""
    if context is None:
        return
    for index, length in enumerate(tokenized.lengths):
        if length > context:
            raise TokenizationError(
                f"prompt {index} is {length} tokens but {label} has a context of {context} tokens; "
                "shorten it or cut it with --tokens N"
            )


def untrained_token_ids(
    embedding: Float[Tensor, "vocab d_model"], token_ids: set[int], chunk: int = 16384
) -> dict[int, float]:
    """Ids among ``token_ids`` whose embedding row looks untrained, with norm / median row norm."""
    # Chunked so a 128k-row bfloat16 matrix is never upcast to float32 all at once.
    norms = torch.cat(
        [
            l2_norm(embedding[start : start + chunk].detach()).cpu()
            for start in range(0, embedding.shape[0], chunk)
        ]
    )
    median = norms.median().item()
    if median == 0:
        return {}
    return {
        token: norms[token].item() / median
        for token in sorted(token_ids)
        if token < norms.shape[0] and norms[token].item() < UNTRAINED_NORM_RATIO * median
    }


# How whitespace is shown in a readable token: visible, so ' France' and 'France' differ on screen.
VISIBLE_WHITESPACE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def readable_tokens(tokenizer, ids) -> tuple[str, ...]:
    """Each id's token as the text it stands for, whitespace made visible: byte-level BPE's
    ``ĠFrance`` and SentencePiece's ``▁France`` both read ``␣France``, ``Ċ`` and ``<0x0A>`` read
    ``↵``; special tokens (``<|im_start|>``) stay as they are. The one form tables, JSON, the
    verdict and the figures show; the raw id is kept beside it everywhere.

    A token is decoded after a fixed one (``a``), and that prefix cut off again, so the decoder
    cannot drop a leading space as it does at the start of a text; a token holding part of a
    multi-byte character reads ``�``."""
    raw = tokenizer.convert_ids_to_tokens(list(ids))
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    out = []
    for token in raw:
        if token is None:
            out.append("")
            continue
        if token in special:
            out.append(token)
            continue
        if decoder is not None:
            text = decoder.decode(["a", token])
            text = text[1:] if text.startswith("a") else text
        else:
            text = tokenizer.convert_tokens_to_string([token])
        out.append("".join(VISIBLE_WHITESPACE.get(char, char) for char in text))
    return tuple(out)
