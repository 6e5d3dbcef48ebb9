"""Where a run keeps finished shards: in memory (notebooks) or in a resumable run folder (the CLI).

Both stores hold, per shard, the per-token metrics of every captured state and,
when asked, each model's residual states (a ``sequential`` run spills the base
model's states here until the SFT model has run; ``--save-residuals`` keeps both).
They also keep what was learnt from each model's weights while it was loaded
(fingerprint, untrained tokens, placement), so a resumed run that never loads a
model again still reports it.

A ``RunFolder`` on disk::

    runs/<pair>-<fingerprint>/
      manifest.json              what the fingerprint was computed from
      models/base.json           facts about each model, written when it was loaded
      metrics/00003.safetensors  one shard's per-state metrics, [state, prompt, pos] float32
      states/base-00003.safetensors  one shard's residual states, [state, prompt, pos, d_model]

Every file is written to a temporary name and renamed into place, so a killed run
(SIGKILL included) leaves only whole files; leftover temporary files are removed
when the folder is opened again.
"""

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lens_compare.capture import ResidualStates
from lens_compare.errors import LensCompareError
from lens_compare.outputs import write_atomically, write_json
from lens_compare.per_token import StateMetrics


class MemoryStore:
    """Everything in RAM: nothing is written to disk (``lens_compare.compare``)."""

    def __init__(self) -> None:
        self._metrics: dict[int, StateMetrics] = {}
        self._states: dict[tuple[str, int], ResidualStates] = {}
        self._facts: dict[str, dict[str, Any]] = {}

    def finished(self, shard: int) -> bool:
        return shard in self._metrics

    def put_metrics(self, shard: int, metrics: StateMetrics) -> None:
        self._metrics[shard] = metrics

    def get_metrics(self, shard: int) -> StateMetrics:
        return self._metrics[shard]

    def has_states(self, role: str, shard: int) -> bool:
        return (role, shard) in self._states

    def put_states(self, role: str, shard: int, states: ResidualStates) -> None:
        self._states[(role, shard)] = states

    def get_states(self, role: str, shard: int) -> ResidualStates:
        return self._states[(role, shard)]

    def state_slice(self, role: str, state: int, shard: int) -> torch.Tensor:
        states = self._states[(role, shard)]
        return states.values[states.states.index(state)]

    def drop_states(self, role: str, shard: int) -> None:
        self._states.pop((role, shard), None)

    def put_facts(self, role: str, facts: dict[str, Any]) -> None:
        self._facts[role] = facts

    def get_facts(self, role: str) -> dict[str, Any] | None:
        return self._facts.get(role)

    def drop_all_states(self) -> None:
        self._states.clear()


class RunFolderError(LensCompareError):
    """A run folder on disk does not belong to this run or is damaged."""


class RunFolder:
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
        for directory in ("metrics", "states", "models"):
            (self.path / directory).mkdir(parents=True, exist_ok=True)
            for stale in (self.path / directory).glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def _metrics_path(self, shard: int) -> Path:
        return self.path / "metrics" / f"{shard:05d}.safetensors"

    def _states_path(self, role: str, shard: int) -> Path:
        return self.path / "states" / f"{role}-{shard:05d}.safetensors"

    def finished_shards(self) -> list[int]:
        return sorted(int(p.stem) for p in (self.path / "metrics").glob("[0-9]*.safetensors"))

    def finished(self, shard: int) -> bool:
        return self._metrics_path(shard).is_file()

    def spilled_shards(self, role: str) -> list[int]:
        return sorted(int(p.stem.rpartition("-")[2]) for p in (self.path / "states").glob(f"{role}-*.safetensors"))

    def put_metrics(self, shard: int, metrics: StateMetrics) -> None:
        tensors = {name: values.contiguous() for name, values in metrics.items()}
        write_atomically(self._metrics_path(shard), lambda tmp: save_file(tensors, str(tmp)))

    def get_metrics(self, shard: int) -> StateMetrics:
        with safe_open(str(self._metrics_path(shard)), "pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}

    def has_states(self, role: str, shard: int) -> bool:
        return self._states_path(role, shard).is_file()

    def put_states(self, role: str, shard: int, states: ResidualStates) -> None:
        metadata = {"n_layers": str(states.n_layers), "states": ",".join(map(str, states.states))}
        tensors = {"values": states.values.contiguous()}
        write_atomically(self._states_path(role, shard), lambda tmp: save_file(tensors, str(tmp), metadata))

    def get_states(self, role: str, shard: int) -> ResidualStates:
        with safe_open(str(self._states_path(role, shard)), "pt") as handle:
            metadata = handle.metadata()
            values = handle.get_tensor("values")
        return ResidualStates(
            n_layers=int(metadata["n_layers"]),
            states=tuple(int(s) for s in metadata["states"].split(",")),
            values=values,
        )

    def state_slice(self, role: str, state: int, shard: int) -> torch.Tensor:
        """One state of one shard, read alone from the spilled file (memory-mapped)."""
        with safe_open(str(self._states_path(role, shard)), "pt") as handle:
            row = [int(s) for s in handle.metadata()["states"].split(",")].index(state)
            return handle.get_slice("values")[row]

    def drop_states(self, role: str, shard: int) -> None:
        self._states_path(role, shard).unlink(missing_ok=True)

    def drop_all_states(self) -> None:
        shutil.rmtree(self.path / "states", ignore_errors=True)

    def put_facts(self, role: str, facts: dict[str, Any]) -> None:
        write_json(self.path / "models" / f"{role}.json", facts)

    def get_facts(self, role: str) -> dict[str, Any] | None:
        path = self.path / "models" / f"{role}.json"
        return json.loads(path.read_text()) if path.is_file() else None


Store = MemoryStore | RunFolder


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
    """Concatenate shards' residual states along the prompt axis, zero-padded to ``width``."""
    values = []
    for part in parts:
        v = part.values
        values.append(torch.nn.functional.pad(v, (0, 0, 0, width - v.shape[2])))
    return ResidualStates(n_layers=parts[0].n_layers, states=parts[0].states, values=torch.cat(values, dim=1))
