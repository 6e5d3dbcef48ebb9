"""Token lengths as prefixes of one capture.

A causal model's states at positions < N do not depend on later tokens, so a run at ``--tokens N``
reads the same per-token values as the first N positions of a run at ``--tokens M > N`` over the
same prompts, whenever its token ids are the first N of the longer run's (the prompts are cut, or
padded with filler text whose tokens do not change where the cut falls). Then the shorter run is
assembled from the longer run's store through ``PrefixView``: its own plan, shard layout and
provenance, the longer run's per-token metrics cut to N positions, and the difference lens's
readings and top positions of the longer run's first N positions (the capture computes them when
its config's ``prefix_lengths`` names N: its sums cover whole prompts and cannot be cut afterwards,
and its top positions rank against the prefix's own mean shift). Where the
ids differ (a chat template wraps the prompt after it is cut), or the run needs the states
themselves (CKA, saved residuals), the length runs on its own. The steering check runs the models
again on whole prompts, so a length read off a longer capture has none of its own (its JSON's
``config.steer`` is false; the capture's own length has it where auto turns it on); ``--steer``
gives every length its own capture.

>>> view = PrefixView(store, 10, token_ids)          # doctest: +SKIP
>>> Comparison(config_at_10).assemble(view)           # doctest: +SKIP
"""

from collections.abc import Mapping
from typing import Any

from lens_compare.config import RunConfig
from lens_compare.engines.store import Key, Kind, Store, Value
from lens_compare.models.tokens import TokenizedPrompts

# What a prefix view reads: a shard's metrics and noise floor (``[..., prompt, pos]`` tensors,
# cut to the prefix), each model's facts (its untrained ids, kept where the prefix has them) and
# the difference lens's readings of the prefix.
_CUT = (Kind.METRICS, Kind.NOISE)
_READ = (*_CUT, Kind.FACTS, Kind.PLAN, Kind.DIFFERENCE_LENS)


def needs_own_capture(config: RunConfig) -> str | None:
    """Why a run at this config cannot be read off a longer one's capture, or None."""
    if config.cka:
        return "CKA reads every token's state, not per-token values"
    if config.save_residuals:
        return "--save-residuals writes the states themselves"
    if config.steer:
        return "--steer runs the steering check on each length's own prompts"
    return None


def is_prefix(short: TokenizedPrompts, long: TokenizedPrompts) -> bool:
    """Whether every prompt's ids (and token classes) at the shorter length are the first ones of
    the longer run's, so that its per-token values are the longer run's first positions."""
    n = max(short.lengths)
    if len(short.token_ids) != len(long.token_ids) or short.chat_template != long.chat_template:
        return False
    if any(ids != other[: len(ids)] for ids, other in zip(short.token_ids, long.token_ids, strict=True)):
        return False
    if (short.content is None) != (long.content is None):
        return False
    classes = short.content is None or all(
        flags == other[: len(flags)] for flags, other in zip(short.content, long.content, strict=True))
    return classes and all(length == n for length in short.lengths)


def capture_lengths(tokenized: Mapping[int, TokenizedPrompts], config: RunConfig) -> dict[int, int]:
    """For each length, the length whose capture it reads: the longest length it is a prefix of
    (itself when none is, or when ``config`` needs its own capture).

    >>> capture_lengths({10: short, 50: long}, config)   # doctest: +SKIP
    {10: 50, 50: 50}
    """
    if needs_own_capture(config):
        return {n: n for n in tokenized}
    longest = max(tokenized)
    return {n: longest if n == longest or is_prefix(tokenized[n], tokenized[longest]) else n for n in tokenized}


class PrefixView:
    """A read-only ``Store`` over a longer run's store, as the run at ``length`` tokens would have
    filled it: metrics and noise floor cut to the first ``length`` positions, each model's untrained
    ids kept where ``token_ids`` (the shorter run's) have them, the difference lens's readings and
    top positions of the first ``length`` positions (there when the capture was asked for them)."""

    def __init__(self, store: Store, length: int, token_ids: tuple[tuple[int, ...], ...]):
        self._store = store
        self._length = length
        self._seen = {str(token) for ids in token_ids for token in ids}

    def _check(self, kind: Kind) -> None:
        if kind not in _READ:
            raise KeyError(f"a prefix view reads {', '.join(k.name for k in _READ)}, not {kind.name}")

    def get(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> Value:
        self._check(kind)
        value = self._store.get(kind, role=role, shard=shard, state=state)
        if kind in _CUT:
            return {name: values[..., : self._length] for name, values in value.items()}
        if kind is Kind.FACTS:
            return {**value, "untrained": {t: r for t, r in value.get("untrained", {}).items() if t in self._seen}}
        if kind is Kind.DIFFERENCE_LENS:
            return {"records": value["prefixes"][str(self._length)],
                    "positions": value["prefix_positions"][str(self._length)]}
        return value

    def has(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> bool:
        if kind is Kind.DIFFERENCE_LENS:
            return self._store.has(kind) and str(self._length) in self._store.get(kind).get("prefixes", {})
        return kind in _READ and self._store.has(kind, role=role, shard=shard, state=state)

    def keys(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
             state: int | None = None) -> list[Key]:
        self._check(kind)
        return self._store.keys(kind, role=role, shard=shard, state=state)

    def put(self, kind: Kind, value: Any, **parts: Any) -> None:
        raise TypeError("a prefix view is read-only: the longer run's store holds the capture")

    def drop(self, kind: Kind, **parts: Any) -> None:
        raise TypeError("a prefix view is read-only: the longer run's store holds the capture")
