"""Which pairs a sweep runs: ``--pairs KEY,KEY,...``, where ``seed`` stands for the seed's 18 pairs
and ``all`` for the whole registry (plus the pairs of ``--pairs-file``).

>>> expand_pairs("llama8b, seed, qwen7b")[:3]
('llama8b', 'qwen0.5b', 'qwen1.5b')
>>> len(expand_pairs("seed"))
18
"""

import difflib

from lens_compare.errors import ConfigError, PairError
from lens_compare.models.pairs import PairSpec, builtin_pairs

SEED = "seed"
ALL = "all"


def seed_pairs() -> tuple[str, ...]:
    """The seed's study: every registered pair that is not one of lens_compare's offline demo pairs."""
    return tuple(key for key, spec in builtin_pairs().items() if not spec.demo)


def expand_pairs(text: str, extra: dict[str, PairSpec] | None = None) -> tuple[str, ...]:
    """The pair keys ``--pairs`` names, in first-seen order, each once.

    ``extra`` holds the pairs of ``--pairs-file`` (``load_pairs_file``): their keys are valid, and
    ``all`` includes them after the registered ones. An unknown key or an empty list is refused
    before anything is planned or loaded.
    """
    registry = {**builtin_pairs(), **(extra or {})}
    words = [word.strip() for word in text.split(",") if word.strip()]
    if not words:
        raise ConfigError(
            f"--pairs {text!r} names no pair; expected KEY,KEY,... (registered keys, {SEED!r} for the "
            f"seed's {len(seed_pairs())} pairs or {ALL!r} for every registered pair)"
        )
    keys: list[str] = []
    for word in words:
        if word == SEED:
            keys += seed_pairs()
        elif word == ALL:
            keys += registry
        elif word in registry:
            keys.append(word)
        else:
            close = difflib.get_close_matches(word, [*registry, SEED, ALL], n=3, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise PairError(
                f"--pairs: unknown pair {word!r}.{hint} Expected registered keys (`python -m lens_compare.run "
                f"--list-pairs` lists them), {SEED!r} or {ALL!r}; declare a pair of your own in --pairs-file."
            )
    return tuple(dict.fromkeys(keys))
