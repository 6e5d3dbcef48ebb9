"""The Store interface: the same checks against the in-memory store and a run folder on disk."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lens_compare.engines import store as store_module
from lens_compare.engines.store import STATE_KINDS, Kind, MemoryStore, RunFolder, Store
from lens_compare.metrics.states import ResidualStates

REPO = Path(__file__).resolve().parents[1]


def _states(seed: int) -> ResidualStates:
    generator = torch.Generator().manual_seed(seed)
    return ResidualStates(n_layers=2, states=(0, 1, 2), values=torch.randn(3, 2, 4, 8, generator=generator),
                          component_layers=(1,), components=torch.randn(1, 2, 2, 4, 8, generator=generator))


def _value(kind: Kind, seed: int):
    """A value of ``kind``, different for each ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return {
        Kind.METRICS: lambda: {"cosine": torch.randn(3, 2, 4, generator=generator),
                               "relative_l2": torch.randn(3, 2, 4, generator=generator)},
        Kind.STATES: lambda: _states(seed),
        Kind.STATE: lambda: torch.randn(2, 4, 8, generator=generator),
        Kind.STATE_METRICS: lambda: {"cosine": torch.randn(2, 4, generator=generator)},
        Kind.KEPT: lambda: {"n_layers": 2, "states": [seed, seed + 1]},
        Kind.NOISE: lambda: {"cosine": torch.randn(3, 2, 4, generator=generator)},
        Kind.DIFFERENCE: lambda: {"difference": torch.randn(3, 2, 8, generator=generator),
                                  "base": torch.randn(3, 2, 8, generator=generator),
                                  "count": torch.tensor([5, seed])},
        Kind.DIFFERENCE_UNITS: lambda: {"units": torch.randn(5, 8, generator=generator).half(),
                                        "norms": torch.rand(5, generator=generator),
                                        "prompt": torch.tensor([0, 0, 1, 1, seed]), "position": torch.arange(5)},
        Kind.DIFFERENCE_LENS: lambda: {"records": [{"layer": 0, "positions": "rest", "reading": "base",
                                                    "promoted": [{"token_id": seed, "logit": 1.5}], "suppressed": []}],
                                       "positions": [{"layer": 0, "positions": "rest", "rank": 1, "prompt": seed,
                                                      "position": 3, "token_id": 7, "cosine": 0.5,
                                                      "norm_ratio": 2.0}]},
        Kind.STEERING: lambda: {"kl_base": torch.tensor(1.5, dtype=torch.float64),
                                "top1_base": torch.tensor(float(seed), dtype=torch.float64),
                                "kl": torch.randn(2, 3, generator=generator).double(),
                                "top1": torch.randn(2, 3, generator=generator).double(),
                                "count": torch.tensor(7.0, dtype=torch.float64)},
        Kind.STEERING_TARGET: lambda: {"sft": torch.randn(2, 4, 8, generator=generator)},
        Kind.FACTS: lambda: {"d_model": 8, "untrained": {str(seed): 0.25}},
        Kind.PLAN: lambda: {"estimate": {"gib": seed}, "lens_chunk_bytes": 1024},
        Kind.OUTPUTS: lambda: {"stem": f"lens_compare_{seed}", "seconds": 1.5},
    }[kind]()


PARTS = {"role": "sft", "shard": 3, "state": 12}


def _parts(kind: Kind, **changed) -> dict:
    return {part: changed.get(part, PARTS[part]) for part in kind.parts}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, ResidualStates):
        return (isinstance(b, ResidualStates) and (a.n_layers, a.states, a.component_layers)
                == (b.n_layers, b.states, b.component_layers) and _same(a.values, b.values)
                and _same(a.components, b.components))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


@pytest.fixture(params=["memory", "folder"])
def store(request, tmp_path) -> Store:
    return MemoryStore() if request.param == "memory" else RunFolder(tmp_path / "run", {"run": 1})


@pytest.mark.parametrize("kind", list(Kind), ids=lambda kind: kind.label)
def test_every_kind_is_put_read_replaced_and_dropped(store, kind):
    parts = _parts(kind)
    assert isinstance(store, Store)
    assert not store.has(kind, **parts) and store.keys(kind) == []
    with pytest.raises(KeyError):
        store.get(kind, **parts)
    first, second = _value(kind, 1), _value(kind, 2)
    assert not _same(first, second)
    store.put(kind, first, **parts)
    assert store.has(kind, **parts)
    assert _same(store.get(kind, **parts), first)
    assert [(key.kind, key.role, key.shard, key.state) for key in store.keys(kind)] == [
        (kind, parts.get("role"), parts.get("shard"), parts.get("state"))]
    store.put(kind, second, **parts)
    assert _same(store.get(kind, **parts), second), "a put replaces the entry"
    assert len(store.keys(kind)) == 1
    store.drop(kind, **parts)
    assert not store.has(kind, **parts) and store.keys(kind) == []
    store.drop(kind, **parts)  # dropping what is not there is no error


def test_keys_list_what_a_resume_reads_and_drop_takes_part_of_a_key(store):
    for role in ("base", "sft"):
        for shard in (4, 0, 10):
            store.put(Kind.STATES, _states(shard), role=role, shard=shard)
            for state in (7, 2):
                store.put(Kind.STATE, _value(Kind.STATE, state), role=role, shard=shard, state=state)
                store.put(Kind.STATE_METRICS, _value(Kind.STATE_METRICS, state), shard=shard, state=state)
    store.put(Kind.METRICS, _value(Kind.METRICS, 0), shard=4)
    assert [key.shard for key in store.keys(Kind.METRICS)] == [4]
    assert [key.shard for key in store.keys(Kind.STATES, role="base")] == [0, 4, 10], "sorted by shard"
    assert [key.state for key in store.keys(Kind.STATE, role="sft", shard=4)] == [2, 7], "sorted by state"
    assert not store.keys(Kind.STATE, role="sft", shard=5)
    store.drop(Kind.STATE_METRICS, shard=4)
    assert {key.shard for key in store.keys(Kind.STATE_METRICS)} == {0, 10}
    store.drop(Kind.STATE, role="base", shard=0, state=7)
    assert [key.state for key in store.keys(Kind.STATE, role="base", shard=0)] == [2]
    assert [key.state for key in store.keys(Kind.STATE, role="sft", shard=0)] == [2, 7]
    for kind in STATE_KINDS:
        store.drop(kind)
    assert not any(store.keys(kind) for kind in STATE_KINDS)
    assert store.has(Kind.METRICS, shard=4) and len(store.keys(Kind.STATE_METRICS)) == 4


def test_get_reads_a_shards_states_in_either_form(store):
    spilled = _states(1)
    store.put(Kind.STATES, spilled, role="base", shard=0)
    # One state of a spilled shard (the residuals file and CKA read them so).
    assert _same(store.get(Kind.STATE, role="base", shard=0, state=2), spilled.values[2])
    assert not store.has(Kind.STATE, role="base", shard=0, state=2) and not store.keys(Kind.STATE)
    # A streamed shard's states kept one entry each are its states.
    for state in (1, 2):
        store.put(Kind.STATE, spilled.values[state], role="sft", shard=0, state=state)
    store.put(Kind.KEPT, {"n_layers": 2, "states": [1, 2]}, role="sft", shard=0)
    kept = store.get(Kind.STATES, role="sft", shard=0)
    assert kept.n_layers == 2 and kept.states == (1, 2) and _same(kept.values, spilled.values[1:])
    assert not store.has(Kind.STATES, role="sft", shard=0)
    with pytest.raises(KeyError):
        store.get(Kind.STATE, role="sft", shard=1, state=2)


@pytest.mark.parametrize("parts", [{}, {"shard": 1, "state": 2}, {"role": "other", "shard": 1}])
def test_a_key_names_exactly_the_parts_of_its_kind(store, parts):
    with pytest.raises(ValueError, match="states entry is addressed by|is not one of"):
        store.put(Kind.STATES, _states(0), **parts)


def test_the_folder_layout_is_the_one_resumed_runs_have(tmp_path):
    folder = RunFolder(tmp_path / "run", {"run": 1})
    for kind in Kind:
        folder.put(kind, _value(kind, 1), **_parts(kind))
    found = sorted(p.relative_to(folder.path).as_posix() for p in folder.path.rglob("*") if p.is_file())
    assert found == ["difference/00003.safetensors", "difference_lens.json",
                     "difference_units/00003-00012.safetensors", "layers/00003/kept-sft.json",
                     "layers/00003/metrics-00012.safetensors", "layers/00003/sft-00012.safetensors", "manifest.json",
                     "metrics/00003.safetensors", "models/sft.json", "noise/00003.safetensors", "outputs.json",
                     "plan.json", "states/sft-00003.safetensors", "steering/00003.safetensors",
                     "steering/target-00003.safetensors"]
    for kind in STATE_KINDS + (Kind.STATE_METRICS,):
        folder.drop(kind)
    assert not (folder.path / "layers").exists() and not (folder.path / "states").exists(), \
        "drop leaves no empty folder behind"
    reopened = RunFolder(tmp_path / "run", {"run": 1})
    assert all(_same(reopened.get(kind, **_parts(kind)), _value(kind, 1))
               for kind in (Kind.METRICS, Kind.NOISE, Kind.DIFFERENCE, Kind.DIFFERENCE_UNITS, Kind.DIFFERENCE_LENS,
                            Kind.STEERING, Kind.STEERING_TARGET, Kind.FACTS, Kind.PLAN, Kind.OUTPUTS))


@pytest.mark.parametrize("kind", [Kind.METRICS, Kind.STATES, Kind.FACTS], ids=lambda kind: kind.label)
def test_an_interrupted_write_leaves_the_entry_as_it_was(tmp_path, monkeypatch, kind):
    folder = RunFolder(tmp_path / "run", {"run": 1})
    parts = _parts(kind)

    def half_then_interrupted(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(store_module, "save_file", half_then_interrupted)
    # A JSON document fails while it is written: NaN is refused.
    broken = {"d_model": float("nan")} if kind is Kind.FACTS else _value(kind, 1)
    with pytest.raises((KeyboardInterrupt, ValueError)):
        folder.put(kind, broken, **parts)
    assert not folder.has(kind, **parts) and not folder.keys(kind)
    assert [p.name for p in folder.path.rglob("*") if p.is_file()] == ["manifest.json"]
    monkeypatch.undo()
    folder.put(kind, _value(kind, 1), **parts)
    monkeypatch.setattr(store_module, "save_file", half_then_interrupted)
    with pytest.raises((KeyboardInterrupt, ValueError)):
        folder.put(kind, broken, **parts)
    assert _same(folder.get(kind, **parts), _value(kind, 1)), "the finished entry is kept"


KILLED_BEFORE_RENAME = textwrap.dedent("""
    import os, signal, sys
    import torch
    from lens_compare.util import outputs
    from lens_compare.engines.store import Kind, RunFolder
    folder = RunFolder(sys.argv[1], {"run": 1})
    outputs.os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
    folder.put(Kind.METRICS, {"cosine": torch.ones(3, 2, 4)}, shard=3)
""")


def test_a_write_killed_before_its_rename_is_not_an_entry(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", KILLED_BEFORE_RENAME, str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    left = list((tmp_path / "run").rglob(".*.tmp"))
    assert len(left) == 1 and left[0].stat().st_size > 0, "the whole file was written, not renamed"
    folder = RunFolder(tmp_path / "run", {"run": 1})
    assert not folder.has(Kind.METRICS, shard=3) and not folder.keys(Kind.METRICS)
    assert not left[0].exists(), "reopening removes it"
