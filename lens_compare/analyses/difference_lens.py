"""The difference lens: the mean shift of the stream (SFT minus base) read through the models' heads.

For each captured layer and each token class, δ = mean over the class's tokens of (sft - base) of
``resid_post``. Read as the activation difference lens of the science-of-finetuning
diffing-toolkit reads it, through the base model's own final norm and unembedding, W_U · norm(δ):
RMSNorm and LayerNorm are scale-free up to their ε, so this reads δ's direction, not its size.
Three readings per layer and class (``READINGS``), each listing the ``top`` token ids it raises
most (``promoted``) and lowers most (``suppressed``):

- ``base``: W_U_base · norm_base(δ), what the base model reads the shift as;
- ``sft``: W_U_sft · norm_sft(δ), what the SFT model reads it as;
- ``logit_difference``: lens_sft(mean SFT state) - lens_base(mean base state), each model's full
  lens logits (its unembedding bias included) at its own mean state of the class: how the two
  models' average predictions at that layer differ, the shift's size and where it starts from
  included, not only its direction.

The token classes (``positions``, named as the residual records name theirs):

- ``rest``: every real token but position 0 (the attention sink), as the residual metrics count;
- ``first_content``: each prompt's first K content tokens (``difference_lens_first``, 5); without
  a chat template every real token but position 0 is content, so these are positions 1..K;
- ``template``: the chat template's tokens but position 0 (``--chat-template sft`` only).

A class with no token gives no records; a reading that is the same for every token (δ = 0 where
both models' states agree exactly, before the first block fine-tuning changed) lists no tokens.
δ is exact over any number of shards: a shard gives sums (``shard_sums``: Σ (sft - base) and
Σ base per layer and class, each prompt's in float32, added up in float64, and the token
counts), which add up, and the readings divide the run's sums once (``read_difference``):
however the prompts were cut into shards, they read the same. The readings are float32: the norm on a float32 copy, a
16-bit unembedding upcast slice by slice. Where δ lives among the prompts' own tokens (the ``top_positions``
whose difference has the largest cosine with it): ``lens_compare.analyses.difference_positions``.

>>> lens = choose_difference_lens(config, logit_lens, layers, tokenized)   # doctest: +SKIP
>>> sums = shard_sums(base.values, sft.values, rows, lens.masks, real)      # doctest: +SKIP
>>> read_difference(heads, sums, lens.layers, lens.positions, top=10)[0]    # doctest: +SKIP
{'layer': 0, 'positions': 'rest', 'reading': 'base', 'promoted': [{'token_id': 9, 'logit': 3.1}, ...], ...}
"""

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from lens_compare.analyses.lens_choice import LensChoice
from lens_compare.capture.head import Head
from lens_compare.config import RunConfig
from lens_compare.errors import ConfigError
from lens_compare.metrics.aggregate import token_mask
from lens_compare.models.token_classes import class_mask
from lens_compare.models.tokens import TokenizedPrompts

POSITIONS = ("rest", "first_content", "template")
READINGS = ("base", "sft", "logit_difference")
# Bytes of a float32 slice of an unembedding upcast at a time, and of the logits computed at a time.
UPCAST_BYTES = 64 * 2**20
LOGITS_BYTES = 256 * 2**20


@dataclass(frozen=True)
class DifferenceLens:
    """What the difference lens does in a run: ``layers`` (empty when off) whose ``resid_post`` it
    reads, over the token classes ``positions`` (``masks``, one row each over the run's padded
    prompts), listing ``top`` tokens each way; ``requested`` the option as given (None: on where the
    logit lens runs); ``reason`` one line on why it is on or off."""

    requested: bool | None
    reason: str
    layers: tuple[int, ...] = ()
    positions: tuple[str, ...] = ()
    masks: Bool[Tensor, "token_class prompt pos"] | None = field(default=None, repr=False, compare=False)
    top: int = 10
    first_content: int = 5
    # Shorter token lengths read off this run's capture (a sweep's): each also summed and read over
    # its first positions alone (``prefix_lengths``).
    cuts: tuple[int, ...] = ()
    # The tokens listed per layer and class whose difference aligns most with δ (0: none;
    # ``lens_compare.analyses.difference_positions``).
    top_positions: int = 5
    # The leading tokens every prompt shares (``TokenizedPrompts.shared_prefix``): the same states in
    # every prompt, so the top positions list them once, in prompt 0.
    shared_prefix: int = 0

    @property
    def on(self) -> bool:
        return bool(self.layers)

    @property
    def states(self) -> tuple[int, ...]:
        """The residual states it reads: each layer's ``resid_post``."""
        return tuple(layer + 1 for layer in self.layers)

    @property
    def ranks_positions(self) -> bool:
        """Whether it lists positions, and so keeps each token's difference until δ is known."""
        return self.on and self.top_positions > 0

    def n_tokens(self) -> dict[str, int]:
        if self.masks is None:
            return {}
        counts = einops.reduce(self.masks.long(), "token_class prompt pos -> token_class", "sum")
        return {name: int(count) for name, count in zip(self.positions, counts.tolist(), strict=True)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON's ``provenance.difference_lens``."""
        return {"requested": self.requested, "on": self.on, "reason": self.reason, "layers": list(self.layers),
                "n_tokens": self.n_tokens(), "top": self.top, "first_content": self.first_content,
                "top_positions": self.top_positions}


def class_masks(real: Bool[Tensor, "prompt pos"], content: tuple[tuple[bool, ...], ...] | None,
                first: int) -> dict[str, Bool[Tensor, "prompt pos"]]:
    """Each token class's tokens (see the module docstring), empty ones included.

    >>> class_masks(torch.ones(1, 8, dtype=torch.bool), None, 3)["first_content"]
    tensor([[False,  True,  True,  True, False, False, False, False]])
    """
    rest = token_mask(real, "rest")
    masks = {"rest": rest}
    if first > 0:
        own = rest if content is None else class_mask(real, content, "content")
        masks["first_content"] = own & (own.cumsum(dim=1) <= first)
    if content is not None:
        masks["template"] = class_mask(real, content, "template")
    return masks


def choose_difference_lens(config: RunConfig, logit_lens: LensChoice, layers: tuple[int, ...],
                           tokenized: TokenizedPrompts) -> DifferenceLens:
    """The difference lens of a run: at every captured layer, wherever the logit lens runs (it
    reads through the heads the lens loads). Asked for (``difference_lens: true``) where the lens
    is off, it refuses the run, before anything loads."""
    requested, top, first = config.difference_lens, config.difference_lens_top, config.difference_lens_first
    options = {"top": top, "first_content": first, "top_positions": config.difference_lens_positions}
    if requested is False:
        return DifferenceLens(requested, "--no-difference-lens", **options)
    if not logit_lens.on:
        if requested:
            raise ConfigError(f"--difference-lens reads through the heads the logit lens loads, and the logit lens "
                              f"is off here ({logit_lens.reason}); drop --difference-lens")
        return DifferenceLens(requested, f"the logit lens is off: {logit_lens.reason}", **options)
    _, real = tokenized.padded(pad_id=0)  # the pad id does not change which tokens are real
    found = {name: mask for name, mask in class_masks(real, tokenized.content, first).items() if mask.any()}
    if not found:
        return DifferenceLens(requested, "no prompt has a token past position 0: no token class to average over",
                              **options)
    return DifferenceLens(requested, "asked for" if requested else "on wherever the logit lens runs", tuple(layers),
                          tuple(found), torch.stack(list(found.values())), cuts=tuple(config.prefix_lengths),
                          shared_prefix=tokenized.shared_prefix, **options)


def describe(lens: DifferenceLens) -> str:
    """One clause for the run's log.

    >>> describe(DifferenceLens(None, "--no-difference-lens"))
    'difference lens off (--no-difference-lens)'
    """
    if not lens.on:
        return f"difference lens off ({lens.reason})"
    classes = ", ".join(f"{name} ({n} tokens)" for name, n in lens.n_tokens().items())
    positions = (f", and the {lens.top_positions} positions whose own difference aligns most with it"
                 if lens.top_positions else "")
    return (f"difference lens at {len(lens.layers)} layer(s) over {classes}: the {lens.top} tokens each mean "
            f"SFT-minus-base shift promotes and suppresses most{positions}")


def class_sums(
    base: Float[Tensor, "layer pos d_model"], sft: Float[Tensor, "layer pos d_model"],
    masks: Bool[Tensor, "token_class pos"],
) -> tuple[Float[Tensor, "layer token_class d_model"], Float[Tensor, "layer token_class d_model"]]:
    """One prompt's Σ (sft - base) and Σ base over each class's tokens at every layer, float32 (the
    difference taken token by token first: close states lose nothing to cancellation)."""
    weights = masks.to(device=base.device, dtype=torch.float32)
    base32 = base.to(torch.float32)
    shift = sft.to(torch.float32) - base32
    # [token_class, pos] @ [layer, pos, d_model]: one batched product over the layers (an einsum
    # of this pattern first copies its operands into another layout: three times slower here).
    return torch.matmul(weights, shift), torch.matmul(weights, base32)


def shard_sums(
    base: Float[Tensor, "state prompt pos d_model"], sft: Float[Tensor, "state prompt pos d_model"],
    rows: tuple[int, ...], masks: Bool[Tensor, "token_class prompt pos"], real: Bool[Tensor, "prompt pos"],
    cuts: tuple[int, ...] = (),
) -> dict[str, Tensor]:
    """A shard's sums over the states ``rows`` of both models' ``[state, prompt, pos, d_model]``
    states: ``difference`` and ``base`` [layer, token_class, d_model] float64, ``count``
    [token_class] int64; and for each of ``cuts`` the same over the first that many positions,
    keyed ``difference.N``, ``base.N``, ``count.N`` (``sums_at``).

    Prompt by prompt over its own (right-padded) tokens, every layer at once, float32 within a prompt
    and float64 across prompts: a prompt's sums are the same whichever shard it is in and however
    wide that shard's padding, and float64 adds them up far below float32's resolution, so that a
    run's readings do not depend on how its prompts were cut into shards."""
    # Consecutive states (every layer's, the usual case) are a view; others are gathered.
    index = slice(rows[0], rows[-1] + 1) if rows == tuple(range(rows[0], rows[-1] + 1)) else torch.tensor(rows)
    widths = (None, *cuts)
    zeros = torch.zeros((len(rows), masks.shape[0], base.shape[-1]), dtype=torch.float64)
    difference = {width: zeros.clone() for width in widths}
    own = {width: zeros.clone() for width in widths}
    count = {width: einops.reduce(masks[:, :, :width].long(), "token_class prompt pos -> token_class", "sum")
             for width in widths}
    lengths = einops.reduce(real.long(), "prompt pos -> prompt", "sum").tolist()
    for prompt, length in enumerate(lengths):
        found = {}
        for width in widths:
            n = length if width is None else min(width, length)
            if n not in found:  # a prompt no longer than a cut: its sums over the cut are its whole sums
                shift, states = class_sums(base[index, prompt, :n], sft[index, prompt, :n], masks[:, prompt, :n])
                found[n] = (shift.double().cpu(), states.double().cpu())
            difference[width] += found[n][0]
            own[width] += found[n][1]
    return {f"{name}{'' if width is None else f'.{width}'}": values[width]
            for width in widths for name, values in (("difference", difference), ("base", own), ("count", count))}


def sums_at(sums: dict[str, Tensor], cut: int | None = None) -> dict[str, Tensor]:
    """The sums over whole prompts (``cut`` None) or over their first ``cut`` positions."""
    suffix = "" if cut is None else f".{cut}"
    return {name: sums[name + suffix] for name in ("difference", "base", "count")}


def stack_sums(rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Sums of one state each (``shard_sums`` of one row: a streamed shard's) -> the shard's."""
    return {key: rows[0][key] if key.startswith("count") else torch.cat([row[key] for row in rows])
            for key in rows[0]}


def add_sums(parts: Iterable[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Several shards' sums as one, each added as it comes (a run's shards need not fit in memory)."""
    total: dict[str, Tensor] = {}
    for part in parts:
        total = {key: total[key] + value if key in total else value for key, value in part.items()}
    return total


def _float32_norm(head: Head) -> torch.nn.Module:
    """The head's final norm computing in float32 (a copy, unless it already does)."""
    if all(p.dtype == torch.float32 for p in head.norm.parameters()):
        return head.norm
    return copy.deepcopy(head.norm).float()


def _unembed(head: Head, resid: Float[Tensor, "row d_model"]) -> Float[Tensor, "row vocab"]:
    """``W_U · norm(resid)`` on the CPU, float32 throughout (the unembedding's bias left out): a
    16-bit unembedding is upcast a slice of ids at a time."""
    with torch.inference_mode():
        normed = _float32_norm(head)(resid.to(head.device, torch.float32)).to(torch.float32)
        weight = head.weight
        if weight.dtype == torch.float32:
            logits = torch.nn.functional.linear(normed, weight)
        else:
            logits = torch.empty((normed.shape[0], head.vocab), device=head.device)
            step = max(1, UPCAST_BYTES // (4 * weight.shape[1]))
            for start in range(0, head.vocab, step):
                logits[:, start:start + step] = torch.nn.functional.linear(normed, weight[start:start + step].float())
        return logits.cpu()


def _listed(values: Float[Tensor, " vocab"], ids: Int[Tensor, " k"]) -> list[dict[str, Any]]:
    return [{"token_id": int(i), "logit": float(values[i])} for i in ids.tolist()]


def read_difference(heads: dict[str, Head], sums: dict[str, Tensor], layers: tuple[int, ...],
                    positions: tuple[str, ...], top: int) -> list[dict[str, Any]]:
    """The readings of a run's summed ``sums`` (``add_sums``): one record per class, reading and
    layer (in that order), ``{"layer", "positions", "reading", "promoted": [{"token_id", "logit"}],
    "suppressed": [...]}``, the ``top`` largest values first and the ``top`` smallest. Token strings
    are the caller's (the base tokenizer's for ``base`` and ``logit_difference``, the SFT one's for
    ``sft``). ``heads`` must cover the same ids (``Head.shared``)."""
    vocabs = {head.vocab for head in heads.values()}
    if len(vocabs) != 1:
        raise ValueError(f"the heads' vocabularies differ ({sorted(vocabs)}): give heads over the shared ids")
    vocab = vocabs.pop()
    k = min(top, vocab)
    count = sums["count"].double()
    kept = [index for index in range(len(positions)) if count[index] > 0]
    n = einops.rearrange(count[kept], "token_class -> 1 token_class 1")
    delta = (sums["difference"][:, kept] / n).float()
    mean_base = (sums["base"][:, kept] / n).float()
    mean_sft = (sums["base"][:, kept] / n + sums["difference"][:, kept] / n).float()
    pairs = [(row, column) for column in range(len(kept)) for row in range(len(layers))]
    # Blocks of (layer, class) pairs whose logits of both heads stay within LOGITS_BYTES: each
    # unembedding is read once per block (once in all but for the largest vocabularies and depths).
    step = max(1, LOGITS_BYTES // (2 * 4 * 2 * vocab))
    # The logit difference compares the models' full lens logits: the unembeddings' biases count there.
    bias = {role: 0.0 if head.bias is None else head.bias.float().cpu() for role, head in heads.items()}
    records = []
    for start in range(0, len(pairs), step):
        block = pairs[start:start + step]
        rows, columns = (torch.tensor(part) for part in zip(*block, strict=True))
        size = len(block)
        base = _unembed(heads["base"], torch.cat([delta[rows, columns], mean_base[rows, columns]]))
        sft = _unembed(heads["sft"], torch.cat([delta[rows, columns], mean_sft[rows, columns]]))
        readings = {"base": base[:size], "sft": sft[:size],
                    "logit_difference": (sft[size:] + bias["sft"]) - (base[size:] + bias["base"])}
        for reading, values in readings.items():
            promoted = torch.topk(values, k, dim=-1)
            suppressed = torch.topk(values, k, dim=-1, largest=False)
            # A reading equal for every token (δ = 0: the models' states agree exactly) ranks nothing.
            flat = values.amax(dim=-1) == values.amin(dim=-1)
            for index, (row, column) in enumerate(block):
                records.append({"layer": layers[row], "positions": positions[kept[column]], "reading": reading,
                                "promoted": [] if flat[index] else _listed(values[index], promoted.indices[index]),
                                "suppressed": [] if flat[index] else _listed(values[index],
                                                                             suppressed.indices[index])})
    order = {name: index for index, name in enumerate(READINGS)}
    return sorted(records, key=lambda r: (positions.index(r["positions"]), order[r["reading"]], r["layer"]))
