"""The pair registry: which base and SFT checkpoints a key such as ``llama8b`` means.

Pairs are data (``lens_compare/data/pairs.yaml`` plus any user YAML), validated
when loaded; nothing in the code branches on a model's name.

>>> from lens_compare.models.pairs import get_pair
>>> get_pair("llama8b").sft
'meta-llama/Llama-3.1-8B-Instruct'
"""

import difflib
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lens_compare.errors import PairError
from lens_compare.models.load_options import QUANTIZATIONS
from lens_compare.util.choices import DTYPES
from lens_compare.util.files import read_structured


@dataclass(frozen=True)
class PairSpec:
    """One registered pair. ``base``/``sft`` are model references the loader understands."""

    key: str
    base: str
    sft: str
    config_key: str | None = None
    seed_base: str | None = None
    seed_sft: str | None = None
    base_dtype: str | None = None
    sft_dtype: str | None = None
    base_quantization: str | None = None
    sft_quantization: str | None = None
    demo: bool = False
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "base": str,
    "sft": str,
    "config_key": str,
    "seed_base": str,
    "seed_sft": str,
    "base_dtype": str,
    "sft_dtype": str,
    "base_quantization": str,
    "sft_quantization": str,
    "demo": bool,
    "note": str,
}


def parse_pairs(data: Any, source: str) -> dict[str, PairSpec]:
    """Validate a ``{"pairs": {key: {...}}}`` mapping; every problem in one error."""
    if not isinstance(data, dict) or not isinstance(data.get("pairs"), dict):
        raise PairError(f"{source}: expected a top-level 'pairs:' mapping of key -> entry")
    problems: list[str] = []
    specs: dict[str, PairSpec] = {}
    for key, entry in data["pairs"].items():
        where = f"{source}: pairs.{key}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a mapping with 'base' and 'sft', got {entry!r}")
            continue
        for name, value in entry.items():
            if name not in _FIELD_TYPES:
                hint = difflib.get_close_matches(str(name), list(_FIELD_TYPES), n=1)
                problems.append(
                    f"{where}.{name}: unknown key"
                    + (f" (did you mean {hint[0]!r}?)" if hint else "")
                    + f"; allowed: {', '.join(_FIELD_TYPES)}"
                )
            elif not isinstance(value, _FIELD_TYPES[name]):
                problems.append(
                    f"{where}.{name}: expected {_FIELD_TYPES[name].__name__}, got {value!r}"
                )
        for required in ("base", "sft"):
            if required not in entry:
                problems.append(f"{where}.{required}: missing (every pair names both models)")
        for side in ("base_dtype", "sft_dtype"):
            if isinstance(entry.get(side), str) and entry[side] not in DTYPES:
                problems.append(f"{where}.{side}: {entry[side]!r} is not one of {DTYPES}")
        for side in ("base_quantization", "sft_quantization"):
            if isinstance(entry.get(side), str) and entry[side] not in QUANTIZATIONS:
                problems.append(f"{where}.{side}: {entry[side]!r} is not one of {QUANTIZATIONS}")
        if not problems:
            specs[str(key)] = PairSpec(key=str(key), **entry)
    if problems:
        raise PairError("invalid pair registry:\n  " + "\n  ".join(problems))
    return specs


def load_pairs_file(path: str | Path) -> dict[str, PairSpec]:
    """Pairs declared in a user YAML file (same form as the built-in registry)."""
    return parse_pairs(read_structured(path, "pairs file", PairError), str(path))


@cache
def builtin_pairs() -> dict[str, PairSpec]:
    """The registry shipped with the package (the seed's 18 pairs plus the demo pairs)."""
    text = resources.files("lens_compare.data").joinpath("pairs.yaml").read_text()
    return parse_pairs(yaml.safe_load(text), "lens_compare/data/pairs.yaml")


def get_pair(key: str, extra: dict[str, PairSpec] | None = None) -> PairSpec:
    """Look a pair up by key, user pairs (``extra``) first; unknown keys get a suggestion."""
    registry = {**builtin_pairs(), **(extra or {})}
    if key in registry:
        return registry[key]
    close = difflib.get_close_matches(key, list(registry), n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise PairError(
        f"unknown pair {key!r}.{hint} Run `python -m lens_compare.run --list-pairs` for all "
        "keys, or pass --base/--sft with hub ids, directories or .gguf files."
    )
