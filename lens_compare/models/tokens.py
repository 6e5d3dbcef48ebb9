"""Turn prompts into one set of token ids that both models will see.

By default the base tokenizer tokenizes and the SFT tokenizer must produce the identical ids
for every prompt, or the run stops before any model is loaded, naming the tokens where they
part. With ``tokenizer="sft"`` (``--tokenizer sft``: an SFT tokenizer with added chat tokens)
the SFT tokenizer's ids go to both models, provided each one has an embedding row for every id;
the ids the base tokenizer lacks are kept (``TokenizedPrompts.base_lacks``) so that the outputs
mark them, since the base model's rows for them were never trained on those tokens.
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
from lens_compare.util.choices import TokenizerName

ChatTemplate = Literal["none", "sft"]
CHAT_TEMPLATES: tuple[ChatTemplate, ...] = ("none", "sft")
TOKENIZERS: tuple[TokenizerName, ...] = ("base", "sft")
# How many tokens of each side an error message names before it writes "...".
NAMED_TOKENS = 8

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
    # Whose tokenizer gave ``token_ids`` ("base", or "sft" with --tokenizer sft).
    tokenizer: TokenizerName = "base"
    # With --tokenizer sft: the ids fed that the base tokenizer lacks (beyond its vocabulary, or its
    # token there is another one), sorted; the base model's embedding rows for them were never
    # trained on these tokens.
    base_lacks: tuple[int, ...] = ()

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


def _offsets(tokenizer, text: str, add_special: bool, ids: tuple[int, ...]) -> list[tuple[int, int]] | None:
    """Each token's characters in ``text``, or None when the tokenizer gives no offsets for ``ids``."""
    if not getattr(tokenizer, "is_fast", False):
        return None
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    return list(encoded["offset_mapping"]) if tuple(encoded["input_ids"]) == ids else None


def _differing_spans(text: str, add_special: bool, tokenizers: tuple, ids: tuple[tuple[int, ...], ...],
                     position: int) -> tuple[int, int]:
    """Where two encodings of ``text`` that part at ``position`` meet again: the end of each side's
    tokens from ``position`` on that cover the same characters (one token each without offsets).
    An SFT tokenizer's added ``<|tool|>`` against the base's ``<``, ``|``, ``tool``, ``|``, ``>``
    (``ids`` base first) gives ``(position + 5, position + 1)``."""
    ends = [min(position + 1, len(side)) for side in ids]
    offsets = [_offsets(tokenizer, text, add_special, side) for tokenizer, side in zip(tokenizers, ids, strict=True)]
    if None in offsets:
        return ends[0], ends[1]
    while all(end > position for end in ends):
        last = [offsets[side][ends[side] - 1][1] for side in (0, 1)]
        if last[0] == last[1]:
            break
        behind = 0 if last[0] < last[1] else 1
        if ends[behind] == len(ids[behind]):
            break
        ends[behind] += 1
    return ends[0], ends[1]


def _reading(tokenizer, ids) -> str:
    """``5 tokens, '<', '|', 'tool', '|', '>' (ids 44, 108, 19324, 108, 46)``: the first few only."""
    if not ids:
        return "no token (its encoding ends there)"
    shown, cut = ids[:NAMED_TOKENS], ", ..." if len(ids) > NAMED_TOKENS else ""
    words = ", ".join(repr(token) for token in readable_tokens(tokenizer, shown))
    plural = "s" if len(ids) > 1 else ""
    return f"{len(ids)} token{plural}, {words}{cut} (id{plural} {', '.join(map(str, shown))}{cut})"


def _beyond_rows(token_ids, vocab_sizes: dict[str, int] | None) -> tuple[str, int, list[int]] | None:
    """The first model (by role) without an embedding row for some of ``token_ids``: its role, its
    rows and those ids; None when both have a row for every id (or their sizes are unknown)."""
    for role, rows in (vocab_sizes or {}).items():
        beyond = sorted({token for ids in token_ids for token in ids if token >= rows})
        if beyond:
            return role, rows, beyond
    return None


def _beyond_words(tokenizer, beyond: tuple[str, int, list[int]]) -> str:
    role, rows, ids = beyond
    shown = ", ".join(f"{readable_tokens(tokenizer, [t])[0]!r} (id {t})" for t in ids[:NAMED_TOKENS])
    return (f"{shown}{', ...' if len(ids) > NAMED_TOKENS else ''} {'is' if len(ids) == 1 else 'are'} beyond "
            f"the {role} model's {rows:,} embedding rows (ids 0..{rows - 1})")


def _disagreement(index: int, text: str, add_special: bool, base_tokenizer, sft_tokenizer,
                  base_ids: tuple[int, ...], sft_ids: tuple[int, ...], sft_beyond: str | None,
                  rows_known: bool) -> str:
    """The refusal when the two tokenizers part on prompt ``index``: the tokens on both sides, and
    whether ``--tokenizer sft`` is a way through (``sft_beyond``: why not; ``rows_known``: the
    models' embedding rows were checked)."""
    position = _first_difference(base_ids, sft_ids)
    base_end, sft_end = _differing_spans(text, add_special, (base_tokenizer, sft_tokenizer), (base_ids, sft_ids),
                                         position)
    head = (f"the base and SFT tokenizers disagree on prompt {index} at token position {position}: the SFT "
            f"tokenizer reads {_reading(sft_tokenizer, sft_ids[position:sft_end])} where the base tokenizer "
            f"reads {_reading(base_tokenizer, base_ids[position:base_end])}; both models must see the same ids")
    if sft_beyond is None and not rows_known:
        return f"{head}. --tokenizer sft feeds the SFT tokenizer's ids to both models where both have rows for them"
    if sft_beyond is None:
        return (f"{head}. Pass --tokenizer sft to feed the SFT tokenizer's ids to both models: the base model has "
                "an embedding row for each (those its tokenizer lacks were never trained on these tokens)")
    return (f"{head}. --tokenizer sft, which feeds the SFT tokenizer's ids to both models, cannot help here: "
            f"{sft_beyond}")


def _lacked_by(base_tokenizer, sft_tokenizer, token_ids) -> tuple[int, ...]:
    """The ids among ``token_ids`` the base tokenizer does not have as the SFT tokenizer's tokens."""
    seen = sorted({token for ids in token_ids for token in ids})
    size = len(base_tokenizer)
    known = [t for t in seen if t < size]
    base = dict(zip(known, base_tokenizer.convert_ids_to_tokens(known), strict=True))
    sft = dict(zip(seen, sft_tokenizer.convert_ids_to_tokens(seen), strict=True))
    return tuple(t for t in seen if t >= size or base[t] != sft[t])


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
    tokenizer: TokenizerName = "base",
    vocab_sizes: dict[str, int] | None = None,
) -> TokenizedPrompts:
    """The ids both models see: the base tokenizer's, which the SFT tokenizer must give too, or
    with ``tokenizer="sft"`` the SFT tokenizer's.

    ``vocab_sizes``: each model's embedding rows by role (its config's ``vocab_size``), when known;
    fed ids must be within them. ``n_tokens`` makes every prompt exactly that long: longer prompts
    are truncated, shorter ones are extended with ``filler_text`` (repeated) or refused.
    """
    if not prompts:
        raise TokenizationError("no prompts given: pass --prompt TEXT or --prompts-file FILE")
    if chat_template not in CHAT_TEMPLATES:
        raise TokenizationError(f"chat template {chat_template!r} is not one of {CHAT_TEMPLATES}")
    if tokenizer not in TOKENIZERS:
        raise TokenizationError(f"tokenizer {tokenizer!r} is not one of {TOKENIZERS}")
    if n_tokens is not None and n_tokens < 1:
        raise TokenizationError(f"--tokens must be a positive integer, got {n_tokens}")
    fed = sft_tokenizer if tokenizer == "sft" else base_tokenizer
    contents = prompts
    if n_tokens is not None and filler_text:
        contents = tuple(_extend_with_filler(prompt, filler_text, n_tokens, fed) for prompt in prompts)
    templated = chat_template == "sft"
    texts = apply_chat_template(contents, sft_tokenizer, "SFT") if templated else contents
    # A chat template writes its own BOS; adding special tokens again would double it.
    add_special = not templated
    encoded = [_encode(fed, text, add_special) for text in texts]
    if tokenizer == "base":
        for index, (text, base_ids) in enumerate(zip(texts, encoded, strict=True)):
            sft_ids = _encode(sft_tokenizer, text, add_special)
            if base_ids != sft_ids:
                every_sft = [_encode(sft_tokenizer, t, add_special)[:n_tokens] for t in texts]
                beyond = _beyond_rows(every_sft, vocab_sizes)
                raise TokenizationError(_disagreement(
                    index, text, add_special, base_tokenizer, sft_tokenizer, base_ids, sft_ids,
                    None if beyond is None else _beyond_words(sft_tokenizer, beyond), vocab_sizes is not None))
    all_ids = []
    for index, ids in enumerate(encoded):
        if n_tokens is not None:
            if len(ids) < n_tokens:
                raise TokenizationError(
                    f"prompt {index} is {len(ids)} tokens, shorter than --tokens {n_tokens}; "
                    "give a longer prompt, or pad it with text: --filler-text TEXT (filler_text in a config file, "
                    "compare(filler_text=...))"
                )
            ids = ids[:n_tokens]
        if not ids:
            raise TokenizationError(f"prompt {index} tokenizes to no tokens at all")
        all_ids.append(ids)
    base_lacks: tuple[int, ...] = ()
    if tokenizer == "sft":
        beyond = _beyond_rows(all_ids, vocab_sizes)
        if beyond is not None:
            # Tokens the prompts never spell out came from the template.
            from_template = templated and not any(sft_tokenizer.decode([token]) in prompt
                                                  for prompt in contents for token in beyond[2])
            raise TokenizationError(
                f"--tokenizer sft: the SFT tokenizer's {_beyond_words(sft_tokenizer, beyond)}, so that model "
                "cannot read them and this pair cannot be compared on these prompts"
                + ("; the SFT chat template writes them (--chat-template none leaves the template out)"
                   if from_template else "")
            )
        base_lacks = _lacked_by(base_tokenizer, sft_tokenizer, all_ids)
    content = class_flags(texts, contents, all_ids, fed) if templated else None
    return TokenizedPrompts(
        prompts=prompts, texts=texts, token_ids=tuple(all_ids), chat_template=chat_template, content=content,
        tokenizer=tokenizer, base_lacks=base_lacks,
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
    embedding: Float[Tensor, "vocab d_model"], token_ids: set[int], chunk: int = 16384,
    known: frozenset[int] = frozenset(),
) -> dict[int, float]:
    """Ids among ``token_ids`` whose embedding row looks untrained, with norm / median row norm;
    the ids in ``known`` (rows known never to have been trained on their tokens: ids the base
    tokenizer lacks) whatever their norm."""
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
        if token < norms.shape[0] and (token in known or norms[token].item() < UNTRAINED_NORM_RATIO * median)
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
