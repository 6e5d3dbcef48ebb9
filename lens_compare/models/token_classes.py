"""Which tokens of a templated prompt are the user's content and which the chat template's.

With ``--chat-template sft`` a prompt becomes the template's text around the user's content:
role markers, special tokens, newlines and any default system prompt the template injects.
Fine-tuning on that format changes the stream at these tokens most (they are what SFT
trained on), so lens_compare aggregates three classes apart:

- ``first``: position 0 (the attention sink; also reported on its own without a template);
- ``template``: every other token the chat template wrote, special tokens included;
- ``content``: the tokens of the user's prompt.

A token is ``content`` when its characters overlap the prompt's span in the templated text
(the tokenizer's offset mapping); a special token never is.

>>> content_flags(text, "What is 23 + 45?", ids, tokenizer)   # doctest: +SKIP
(False, False, ..., True, True, ..., False)
"""

import logging

import torch
from jaxtyping import Bool
from torch import Tensor

logger = logging.getLogger("lens_compare")

TOKEN_CLASSES = ("template", "content")


def content_flags(text: str, content: str, ids: tuple[int, ...], tokenizer) -> tuple[bool, ...] | None:
    """Per token of ``ids`` (the encoding of ``text``): does it belong to ``content``? None when
    the tokenizer gives no offsets (a slow tokenizer) or its offsets do not match ``ids``."""
    start = text.rfind(content)
    if start < 0 or not getattr(tokenizer, "is_fast", False):
        return None
    end = start + len(content)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if tuple(encoded["input_ids"][: len(ids)]) != tuple(ids):
        return None
    special = set(tokenizer.all_special_ids)
    return tuple(
        token not in special and s < end and e > start and e > s
        for token, (s, e) in zip(ids, encoded["offset_mapping"][: len(ids)], strict=True)
    )


def class_flags(texts: tuple[str, ...], contents: tuple[str, ...], token_ids, tokenizer):
    """``content_flags`` of every prompt, or None (with a log line) when any cannot be told apart."""
    flags = []
    for text, content, ids in zip(texts, contents, token_ids, strict=True):
        found = content_flags(text, content, ids, tokenizer)
        if found is None:
            logger.info("token classes: the tokenizer cannot map tokens back to the prompt's text, so template "
                        "and content tokens are not aggregated apart")
            return None
        flags.append(found)
    return tuple(flags)


def class_mask(
    real: Bool[Tensor, "prompt pos"], content: tuple[tuple[bool, ...], ...], name: str
) -> Bool[Tensor, "prompt pos"]:
    """The real tokens of class ``name`` (``template`` or ``content``), position 0 excluded."""
    if name not in TOKEN_CLASSES:
        raise ValueError(f"token class must be one of {TOKEN_CLASSES}, got {name!r}")
    flags = torch.zeros_like(real)
    for row, row_flags in enumerate(content):
        flags[row, : len(row_flags)] = torch.tensor(row_flags, dtype=torch.bool)
    keep = real & (flags if name == "content" else ~flags)
    keep[:, 0] = False
    return keep
