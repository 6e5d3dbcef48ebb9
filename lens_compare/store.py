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
      layers/00003/base-00012.safetensors  a streamed shard's state 12, [prompt, pos, d_model]
      layers/00003/metrics-00012.safetensors  its per-token metrics, [prompt, pos] each
      noise/00003.safetensors    the noise floor's per-state metrics of a shard (--noise-floor)

A streamed run (``--strategy stream``) goes layer by layer: after each block of both
models it stores the newest state of both (the frontier it resumes from) and that
state's metrics; when the shard's last block is done its metrics are stacked into
``metrics/`` like any other shard's and the layer files are removed (``--save-residuals``
keeps the captured states there instead, one file per state).

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
        # One state at a time (the streamed engine).
        self._layer_states: dict[tuple[str, int, int], torch.Tensor] = {}
        self._layer_metrics: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        # The noise floor's per-state metrics (the SFT model against itself in a second precision).
        self._noise: dict[int, StateMetrics] = {}

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
        if (role, shard, state) in self._layer_states:
            return self._layer_states[(role, shard, state)]
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
        self._layer_states.clear()

    def put_state(self, role: str, shard: int, state: int, values: torch.Tensor) -> None:
        self._layer_states[(role, shard, state)] = values

    def get_state(self, role: str, shard: int, state: int) -> torch.Tensor:
        return self._layer_states[(role, shard, state)]

    def drop_state(self, role: str, shard: int, state: int) -> None:
        self._layer_states.pop((role, shard, state), None)

    def layer_states(self, role: str, shard: int) -> list[int]:
        return sorted(s for r, sh, s in self._layer_states if r == role and sh == shard)

    def put_state_metrics(self, shard: int, state: int, metrics: dict[str, torch.Tensor]) -> None:
        self._layer_metrics[(shard, state)] = metrics

    def get_state_metrics(self, shard: int, state: int) -> dict[str, torch.Tensor]:
        return self._layer_metrics[(shard, state)]

    def drop_state_metrics(self, shard: int) -> None:
        for key in [k for k in self._layer_metrics if k[0] == shard]:
            del self._layer_metrics[key]

    def put_noise(self, shard: int, metrics: StateMetrics) -> None:
        self._noise[shard] = metrics

    def get_noise(self, shard: int) -> StateMetrics:
        return self._noise[shard]

    def has_noise(self, shard: int) -> bool:
        return shard in self._noise

    def keep_layer_states(self, role: str, shard: int, n_layers: int, states: tuple[int, ...]) -> None:
        """A streamed shard's kept states become the shard's ``ResidualStates``."""
        values = torch.stack([self._layer_states.pop((role, shard, state)) for state in states])
        self._states[(role, shard)] = ResidualStates(n_layers=n_layers, states=states, values=values)


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
        for directory in ("metrics", "states", "models", "layers", "noise"):
            (self.path / directory).mkdir(parents=True, exist_ok=True)
            for stale in (self.path / directory).rglob(".*.tmp"):
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
        metadata = {"n_layers": str(states.n_layers), "states": ",".join(map(str, states.states)),
                    "component_layers": ",".join(map(str, states.component_layers))}
        tensors = {"values": states.values.contiguous()}
        if states.components is not None:
            tensors["components"] = states.components.contiguous()
        write_atomically(self._states_path(role, shard), lambda tmp: save_file(tensors, str(tmp), metadata))

    def get_states(self, role: str, shard: int) -> ResidualStates:
        kept = self.path / "layers" / f"{shard:05d}" / f"kept-{role}.json"
        if kept.is_file():
            document = json.loads(kept.read_text())
            states = tuple(document["states"])
            values = torch.stack([self.get_state(role, shard, state) for state in states])
            return ResidualStates(n_layers=document["n_layers"], states=states, values=values)
        with safe_open(str(self._states_path(role, shard)), "pt") as handle:
            metadata = handle.metadata()
            values = handle.get_tensor("values")
            components = handle.get_tensor("components") if "components" in handle.keys() else None  # noqa: SIM118 (a safetensors handle)
        return ResidualStates(
            n_layers=int(metadata["n_layers"]),
            states=tuple(int(s) for s in metadata["states"].split(",")),
            values=values,
            component_layers=tuple(int(s) for s in metadata.get("component_layers", "").split(",") if s),
            components=components,
        )

    def state_slice(self, role: str, state: int, shard: int) -> torch.Tensor:
        """One state of one shard, read alone from the spilled file (memory-mapped)."""
        layer_file = self._layer_path(shard, f"{role}-{state:05d}")
        if layer_file.is_file():
            return self.get_state(role, shard, state)
        with safe_open(str(self._states_path(role, shard)), "pt") as handle:
            row = [int(s) for s in handle.metadata()["states"].split(",")].index(state)
            return handle.get_slice("values")[row]

    def drop_states(self, role: str, shard: int) -> None:
        self._states_path(role, shard).unlink(missing_ok=True)

    def drop_all_states(self) -> None:
        shutil.rmtree(self.path / "states", ignore_errors=True)
        shutil.rmtree(self.path / "layers", ignore_errors=True)

    def _layer_path(self, shard: int, stem: str) -> Path:
        return self.path / "layers" / f"{shard:05d}" / f"{stem}.safetensors"

    def put_state(self, role: str, shard: int, state: int, values: torch.Tensor) -> None:
        tensors = {"values": values.contiguous()}
        write_atomically(self._layer_path(shard, f"{role}-{state:05d}"), lambda tmp: save_file(tensors, str(tmp)))

    def get_state(self, role: str, shard: int, state: int) -> torch.Tensor:
        with safe_open(str(self._layer_path(shard, f"{role}-{state:05d}")), "pt") as handle:
            return handle.get_tensor("values")

    def drop_state(self, role: str, shard: int, state: int) -> None:
        self._layer_path(shard, f"{role}-{state:05d}").unlink(missing_ok=True)

    def layer_states(self, role: str, shard: int) -> list[int]:
        folder = self.path / "layers" / f"{shard:05d}"
        return sorted(int(p.stem.rpartition("-")[2]) for p in folder.glob(f"{role}-[0-9]*.safetensors"))

    def put_state_metrics(self, shard: int, state: int, metrics: dict[str, torch.Tensor]) -> None:
        tensors = {name: values.contiguous() for name, values in metrics.items()}
        write_atomically(self._layer_path(shard, f"metrics-{state:05d}"), lambda tmp: save_file(tensors, str(tmp)))

    def get_state_metrics(self, shard: int, state: int) -> dict[str, torch.Tensor]:
        with safe_open(str(self._layer_path(shard, f"metrics-{state:05d}")), "pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}

    def drop_state_metrics(self, shard: int) -> None:
        for path in (self.path / "layers" / f"{shard:05d}").glob("metrics-*.safetensors"):
            path.unlink()

    def keep_layer_states(self, role: str, shard: int, n_layers: int, states: tuple[int, ...]) -> None:
        """A streamed shard's kept states stay one file per state (never stacked in memory);
        ``kept-{role}.json`` says which, for ``get_states``."""
        document = {"n_layers": n_layers, "states": list(states)}
        write_json(self.path / "layers" / f"{shard:05d}" / f"kept-{role}.json", document)

    def _noise_path(self, shard: int) -> Path:
        return self.path / "noise" / f"{shard:05d}.safetensors"

    def put_noise(self, shard: int, metrics: StateMetrics) -> None:
        tensors = {name: values.contiguous() for name, values in metrics.items()}
        write_atomically(self._noise_path(shard), lambda tmp: save_file(tensors, str(tmp)))

    def get_noise(self, shard: int) -> StateMetrics:
        with safe_open(str(self._noise_path(shard)), "pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (a safetensors handle)

    def has_noise(self, shard: int) -> bool:
        return self._noise_path(shard).is_file()

    def put_record(self, name: str, document: dict[str, Any]) -> None:
        """A small JSON record about the run itself (``outputs``: the stem its outputs were written
        under and the seconds it took), kept beside its shards."""
        write_json(self.path / f"{name}.json", document)

    def get_record(self, name: str) -> dict[str, Any] | None:
        path = self.path / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

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
