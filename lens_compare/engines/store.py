"""Where a run keeps finished shards: in memory (notebooks) or in a resumable run folder (the CLI).

Both stores implement one interface, ``Store``: ``put``, ``get``, ``has`` and ``drop`` an entry of
a ``Kind``, addressed by the parts that kind declares (a model's ``role``, a ``shard``, a ``state``),
and ``keys`` to list what a resumed run already holds. Per shard they hold the per-token metrics of
every captured state and, when asked, each model's residual states (a ``sequential`` run spills
the base model's states here until the SFT model has run; ``--save-residuals`` keeps both). They
also keep what was learnt from each model's weights while it was loaded (fingerprint, untrained
tokens, placement), so a resumed run that never loads a model again still reports it.

A ``RunFolder`` on disk::

    runs/<pair>-<fingerprint>/
      manifest.json              what the fingerprint was computed from
      plan.json, outputs.json    the run's first plan; the stem and seconds of its outputs
      models/base.json           facts about each model, written when it was loaded
      metrics/00003.safetensors  one shard's per-state metrics, [state, prompt, pos] float32
      states/base-00003.safetensors  one shard's residual states, [state, prompt, pos, d_model]
      layers/00003/base-00012.safetensors  a streamed shard's state 12, [prompt, pos, d_model]
      layers/00003/metrics-00012.safetensors  its per-token metrics, [prompt, pos] each
      layers/00003/kept-base.json  the states of a finished streamed shard kept one file each
      noise/00003.safetensors    the noise floor's per-state metrics of a shard (--noise-floor)
      difference/00003.safetensors  the difference lens's sums of a shard, [layer, class, d_model]
      difference_units/00003-00012.safetensors  each token's difference at state 12 of a shard, as a
                                 float16 unit vector and its float32 norm, until the readings rank them
      difference_lens.json       its readings (and top positions), once every shard's sums are in
      steering/00003.safetensors  the steering check's sums of a shard (--steer), once δ is known; the
                                  held-out prompts' (--steer-prompts) are the unit after the last shard
      steering/target-00003.safetensors  a sequential run's SFT last states of a unit, until steered

A streamed run (``--strategy stream``) goes layer by layer: after each block of both
models it stores the newest state of both (the frontier it resumes from) and that
state's metrics; when the shard's last block is done its metrics are stacked into
``metrics/`` like any other shard's and the layer files are removed (``--save-residuals``
keeps the captured states there instead, one file per state, listed in ``kept-<role>.json``).
A streamed state's metrics also carry the difference lens's sums of that state until the
shard's are stacked into ``difference/``. With the steering check (``--steer``) a finished streamed
shard keeps in ``layers/`` the states the check starts from (the base model's after each steered
layer, both models' last) until its steering sums are stored; held-out prompts whose check takes
more than one pass keep theirs there too, as the unit after the last shard.

The difference lens's readings need both models' heads and every shard's sums: whichever
call finishes the last shard's sums (in any process) computes them, while its models are
loaded, and stores them once for the run; a duplicate computation writes the same file.
Its top positions need each token's difference a second time, once the mean shift is known:
each shard's are kept (``difference_units/``, written before its sums) until the readings
are stored, then dropped.

Every file is written to a temporary name and renamed into place, so a killed run
(SIGKILL included) leaves only whole files; leftover temporary files are removed
when the folder is opened again. A folder emptied by ``drop`` is removed.
"""

import json
import re
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lens_compare.errors import LensCompareError
from lens_compare.metrics.per_token import StateMetrics
from lens_compare.metrics.states import ResidualStates
from lens_compare.util.outputs import write_atomically, write_json

# The two models whose entries a store holds.
ROLES = ("base", "sft")


class Kind(Enum):
    """What a store holds: each kind's value, and the parts that address one entry of it."""

    METRICS = "metrics", ("shard",)  # StateMetrics: a shard's per-token metrics, [state, prompt, pos] each
    STATES = "states", ("role", "shard")  # ResidualStates: one model's captured states of a shard
    # Tensor [prompt, pos, d_model]: one state (a stream's; or one a streamed steering unit keeps)
    STATE = "state", ("role", "shard", "state")
    # dict of [prompt, pos] tensors: one state's metrics (and, streamed, its difference-lens sums)
    STATE_METRICS = "state_metrics", ("shard", "state")
    KEPT = "kept", ("role", "shard")  # {"n_layers", "states"}: the STATE entries a stream kept as the STATES
    NOISE = "noise", ("shard",)  # StateMetrics: the noise floor's metrics of a shard
    # {"difference", "base": [layer, class, d_model] float64 sums, "count": [class]} (and each cut's,
    # "difference.N", ...): a shard's difference-lens sums (lens_compare.analyses.difference_lens.shard_sums)
    DIFFERENCE = "difference", ("shard",)
    # {"units": [token, d_model] float16, "norms": [token] float32, "prompt", "position": [token] int64}:
    # each token's SFT-minus-base difference at one lens state of a shard, kept until the difference lens
    # ranks its positions (lens_compare.analyses.difference_positions.unit_differences)
    DIFFERENCE_UNITS = "difference_units", ("shard", "state")
    # {"records": [...], "prefixes": {"N": [...]}, "positions": [...] | None, "prefix_positions": {"N": ...}}:
    # the difference lens's readings and top positions of the run (and of the first N positions of each
    # shorter length a sweep reads off it)
    DIFFERENCE_LENS = "difference_lens", ()
    # {"kl_base", "top1_base", "count": scalars, "kl", "top1": [layer, alpha]} float64: a steering unit's
    # sums (lens_compare.analyses.steering), computed once the difference lens's δ is known. The units
    # are the run's shards, then the held-out prompts (--steer-prompts) as unit ``count`` (Job.steering_units)
    STEERING = "steering", ("shard",)
    # {"sft": [prompt, pos, d_model]}: the SFT model's last resid_post of a steering unit, kept by a
    # sequential run while the base model loads for the steering check (the SFT head reads it there)
    STEERING_TARGET = "steering_target", ("shard",)
    FACTS = "facts", ("role",)  # dict: what was learnt from a model's weights while it was loaded
    PLAN = "plan", ()  # {"estimate", "lens_chunk_bytes"}: the plan the run started with
    OUTPUTS = "outputs", ()  # {"stem", "seconds"}: where the run's outputs went, and its time

    def __init__(self, label: str, parts: tuple[str, ...]):
        self.label = label
        self.parts = parts


# The kinds that hold residual states: a run that does not save them drops them at its end.
STATE_KINDS = (Kind.STATES, Kind.STATE, Kind.KEPT)

Value = ResidualStates | Tensor | dict[str, Any]


@dataclass(frozen=True)
class Key:
    """One entry of a store: its kind and exactly the parts that kind is addressed by."""

    kind: Kind
    role: str | None = None
    shard: int | None = None
    state: int | None = None

    def __post_init__(self) -> None:
        given = tuple(part for part in ("role", "shard", "state") if getattr(self, part) is not None)
        if given != self.kind.parts:
            raise ValueError(f"a {self.kind.label} entry is addressed by {self.kind.parts}, got {given}")
        if self.role is not None and self.role not in ROLES:
            raise ValueError(f"role {self.role!r} is not one of {ROLES}")

    def matches(self, role: str | None, shard: int | None, state: int | None) -> bool:
        """Whether this key has every part given (``None``: any)."""
        return all(want is None or want == have
                   for want, have in ((role, self.role), (shard, self.shard), (state, self.state)))


@runtime_checkable
class Store(Protocol):
    """Finished work of a run, by kind and parts (see ``Kind`` for what each holds).

    ``get`` reads a shard's residual states in either form a run left them: a ``STATE`` from the
    row of the shard's ``STATES`` when it was not stored alone, the ``STATES`` from the ``STATE``
    entries its ``KEPT`` entry lists when they were not stored stacked. ``has``, ``drop`` and
    ``keys`` see only the entries stored as that kind.
    """

    def put(self, kind: Kind, value: Value, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> None:
        """Store ``value`` as the entry (a whole one, replacing any there)."""

    def get(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> Value:
        """The entry's value; ``KeyError`` if it is not there."""

    def has(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> bool:
        """Whether the entry is there."""

    def drop(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
             state: int | None = None) -> None:
        """Remove every entry of ``kind`` with the parts given (none given: all of that kind)."""

    def keys(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
             state: int | None = None) -> list[Key]:
        """The entries of ``kind`` with the parts given, sorted by role, shard and state."""


class _EntryStore(ABC):
    """``Store``'s methods over the primitives a store implements on whole entries."""

    @abstractmethod
    def _write(self, key: Key, value: Value) -> None:
        """Store ``value`` under ``key``, all or nothing."""

    @abstractmethod
    def _read(self, key: Key) -> Value:
        """The value stored under ``key`` (which is there)."""

    @abstractmethod
    def _holds(self, key: Key) -> bool:
        """Whether ``key`` is stored."""

    @abstractmethod
    def _remove(self, key: Key) -> None:
        """Forget ``key`` (which is there)."""

    @abstractmethod
    def _stored(self, kind: Kind) -> list[Key]:
        """Every stored key of ``kind``."""

    @abstractmethod
    def _row(self, role: str, shard: int, state: int) -> Tensor:
        """State ``state`` read alone from the shard's stored ``STATES`` entry."""

    def put(self, kind: Kind, value: Value, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> None:
        self._write(Key(kind, role, shard, state), value)

    def get(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> Value:
        key = Key(kind, role, shard, state)
        if self._holds(key):
            return self._read(key)
        if kind is Kind.STATE and self._holds(Key(Kind.STATES, role, shard)):
            return self._row(role, shard, state)
        if kind is Kind.STATES and self._holds(Key(Kind.KEPT, role, shard)):
            kept = self._read(Key(Kind.KEPT, role, shard))
            states = tuple(kept["states"])
            values = torch.stack([self._read(Key(Kind.STATE, role, shard, s)) for s in states])
            return ResidualStates(n_layers=kept["n_layers"], states=states, values=values)
        raise KeyError(key)

    def has(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
            state: int | None = None) -> bool:
        return self._holds(Key(kind, role, shard, state))

    def drop(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
             state: int | None = None) -> None:
        for key in self.keys(kind, role=role, shard=shard, state=state):
            self._remove(key)

    def keys(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
             state: int | None = None) -> list[Key]:
        given = {part: value for part, value in (("role", role), ("shard", shard), ("state", state))
                 if value is not None}
        if not set(given) <= set(kind.parts):
            raise ValueError(f"a {kind.label} entry is addressed by {kind.parts}, got {tuple(given)}")
        if len(given) == len(kind.parts):  # one whole key: no listing
            key = Key(kind, role, shard, state)
            return [key] if self._holds(key) else []
        found = [key for key in self._stored(kind) if key.matches(role, shard, state)]
        return sorted(found, key=lambda key: (key.role or "", key.shard or 0, key.state or 0))


class MemoryStore(_EntryStore):
    """Everything in RAM: nothing is written to disk (``lens_compare.compare``)."""

    def __init__(self) -> None:
        self._entries: dict[Key, Value] = {}

    def _write(self, key: Key, value: Value) -> None:
        self._entries[key] = value

    def _read(self, key: Key) -> Value:
        return self._entries[key]

    def _holds(self, key: Key) -> bool:
        return key in self._entries

    def _remove(self, key: Key) -> None:
        del self._entries[key]

    def _stored(self, kind: Kind) -> list[Key]:
        return [key for key in self._entries if key.kind is kind]

    def _row(self, role: str, shard: int, state: int) -> Tensor:
        states = self._entries[Key(Kind.STATES, role, shard)]
        return states.values[states.states.index(state)]


class RunFolderError(LensCompareError):
    """A run folder on disk does not belong to this run or is damaged."""


# Each kind's file, relative to the run folder; shards and states are written with five digits.
_LAYOUT = {
    Kind.METRICS: "metrics/{shard}.safetensors",
    Kind.STATES: "states/{role}-{shard}.safetensors",
    Kind.STATE: "layers/{shard}/{role}-{state}.safetensors",
    Kind.STATE_METRICS: "layers/{shard}/metrics-{state}.safetensors",
    Kind.KEPT: "layers/{shard}/kept-{role}.json",
    Kind.NOISE: "noise/{shard}.safetensors",
    Kind.DIFFERENCE: "difference/{shard}.safetensors",
    Kind.DIFFERENCE_UNITS: "difference_units/{shard}-{state}.safetensors",
    Kind.DIFFERENCE_LENS: "difference_lens.json",
    Kind.STEERING: "steering/{shard}.safetensors",
    Kind.STEERING_TARGET: "steering/target-{shard}.safetensors",
    Kind.FACTS: "models/{role}.json",
    Kind.PLAN: "plan.json",
    Kind.OUTPUTS: "outputs.json",
}
_PART_PATTERNS = {"role": "|".join(ROLES), "shard": r"\d{5,}", "state": r"\d{5,}"}


def _path_pattern(template: str) -> re.Pattern[str]:
    """``template`` as a regular expression that reads the parts back from a relative path."""
    pieces = re.split(r"\{(\w+)\}", template)  # literal, part, literal, ..., literal
    return re.compile("".join(re.escape(piece) if i % 2 == 0 else f"(?P<{piece}>{_PART_PATTERNS[piece]})"
                              for i, piece in enumerate(pieces)))


_PATTERNS = {kind: _path_pattern(template) for kind, template in _LAYOUT.items()}


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, written atomically."""
    contiguous = {name: values.contiguous() for name, values in tensors.items()}
    write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata))


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata."""
    with safe_open(str(path), "pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safetensors handle)
        return tensors, handle.metadata() or {}


def _state_list(metadata: dict[str, str], name: str) -> tuple[int, ...]:
    return tuple(int(s) for s in metadata.get(name, "").split(",") if s)


def _as_tensors(kind: Kind, value: Value) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    """A tensor kind's value as a safetensors file's tensors and metadata."""
    if kind is Kind.STATE:
        return {"values": value}, None
    if kind is Kind.STATES:
        tensors = {"values": value.values}
        if value.components is not None:
            tensors["components"] = value.components
        return tensors, {"n_layers": str(value.n_layers), "states": ",".join(map(str, value.states)),
                         "component_layers": ",".join(map(str, value.component_layers))}
    return value, None


def _from_tensors(kind: Kind, tensors: dict[str, Tensor], metadata: dict[str, str]) -> Value:
    if kind is Kind.STATE:
        return tensors["values"]
    if kind is Kind.STATES:
        return ResidualStates(n_layers=int(metadata["n_layers"]), states=_state_list(metadata, "states"),
                              values=tensors["values"], components=tensors.get("components"),
                              component_layers=_state_list(metadata, "component_layers"))
    return tensors


class RunFolder(_EntryStore):
    """A resumable run on disk (see the module docstring for the layout)."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest
        self._check_or_create()

    def _check_or_create(self) -> None:
        manifest_path = self.path / "manifest.json"
        if manifest_path.is_file():
            found = json.loads(manifest_path.read_text())
            if found != json.loads(json.dumps(self.manifest)):
                raise RunFolderError(
                    f"run folder {str(self.path)!r} holds a different run (its manifest.json does not "
                    "match this command's); move it away or use another --out"
                )
        else:
            write_json(manifest_path, self.manifest)
        for stale in self.path.rglob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _path(self, key: Key) -> Path:
        parts = {part: getattr(key, part) for part in key.kind.parts}
        return self.path / _LAYOUT[key.kind].format(
            **{part: value if part == "role" else f"{value:05d}" for part, value in parts.items()})

    def _write(self, key: Key, value: Value) -> None:
        if _LAYOUT[key.kind].endswith(".json"):
            write_json(self._path(key), value)
        else:
            _write_tensors(self._path(key), *_as_tensors(key.kind, value))

    def _read(self, key: Key) -> Value:
        if _LAYOUT[key.kind].endswith(".json"):
            return json.loads(self._path(key).read_text())
        return _from_tensors(key.kind, *_read_tensors(self._path(key)))

    def _holds(self, key: Key) -> bool:
        return self._path(key).is_file()

    def _remove(self, key: Key) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        # The folders it leaves empty below its kind's own (a shard's layers/NNNNN/); the kind's
        # folder, which other shards' writers share, goes only when the whole kind is dropped.
        top = self.path / Path(_LAYOUT[key.kind]).parts[0]
        for folder in path.parents:
            if folder in (top, self.path) or any(folder.iterdir()):
                break
            folder.rmdir()

    def drop(self, kind: Kind, *, role: str | None = None, shard: int | None = None,
             state: int | None = None) -> None:
        super().drop(kind, role=role, shard=shard, state=state)
        top = self.path / Path(_LAYOUT[kind]).parts[0]
        whole_kind = (role, shard, state) == (None, None, None)
        if whole_kind and top.is_dir() and not any(path.is_file() for path in top.rglob("*")):
            shutil.rmtree(top)

    def _stored(self, kind: Kind) -> list[Key]:
        template = _LAYOUT[kind]
        found = []
        for path in self.path.glob(template.format(**{part: "*" for part in kind.parts})):
            match = _PATTERNS[kind].fullmatch(path.relative_to(self.path).as_posix())
            if match:
                parts = match.groupdict()
                found.append(Key(kind, **{part: value if part == "role" else int(value)
                                          for part, value in parts.items()}))
        return found

    def _row(self, role: str, shard: int, state: int) -> Tensor:
        """Memory-mapped: the rest of the file is not read."""
        with safe_open(str(self._path(Key(Kind.STATES, role, shard))), "pt") as handle:
            row = _state_list(handle.metadata(), "states").index(state)
            return handle.get_slice("values")[row]


def stack_metrics(parts: list[dict[str, torch.Tensor]], width: int) -> StateMetrics:
    """Concatenate shards' metrics along the prompt axis, NaN-padded to ``width`` positions.

    (Shards differ in prompts and width, so ``parts`` carries no shape annotation.)"""
    out: StateMetrics = {}
    for name in parts[0]:
        padded = []
        for part in parts:
            values = part[name]
            pad = torch.full((*values.shape[:2], width - values.shape[2]), torch.nan, dtype=values.dtype)
            padded.append(torch.cat([values, pad], dim=2))
        out[name] = torch.cat(padded, dim=1)
    return out


def stack_states(parts: list[ResidualStates], width: int) -> ResidualStates:
    """Concatenate shards' residual states (and sublayer outputs) along the prompt axis,
    zero-padded to ``width``."""
    def padded(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (0, 0, 0, width - tensor.shape[-2]))

    values = torch.cat([padded(part.values) for part in parts], dim=1)
    components = None
    if all(part.components is not None for part in parts):
        components = torch.cat([padded(part.components) for part in parts], dim=2)
    return ResidualStates(n_layers=parts[0].n_layers, states=parts[0].states, values=values,
                          component_layers=parts[0].component_layers if components is not None else (),
                          components=components)
