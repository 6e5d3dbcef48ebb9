"""The steering check on the ``stream`` engine: its records against the resident engine's (held-out
prompts included), what the steering pass reads from each checkpoint, passes split to fit memory, a
resume after an interruption between units, the planted pair, and the disk its kept states take."""

import logging

import pytest
import torch

import lens_compare
from lens_compare import RunConfig
from lens_compare.capture.streamed import StreamedModel
from lens_compare.engines import stream as stream_engine
from lens_compare.engines import stream_steering
from lens_compare.engines.store import Kind, MemoryStore
from lens_compare.pipeline.comparison import Comparison, open_run_folder, run_comparison
from lens_compare.pipeline.steps import spill_bytes
from tests.fixtures.tiny_models import planted_pair
from tests.test_steering import HELD_OUT, PROMPTS, _config, _cpu

# The perturbed tiny llama has 3 blocks: steering after block 1 runs block 2 again; after block 2
# (the last) it runs no block, only the head.
LAYERS, ALPHAS = (1, 2), (1.0, 2.0)


def _held_out(tmp_path) -> str:
    path = tmp_path / "held_out.txt"
    path.write_text("\n".join(HELD_OUT) + "\n")
    return str(path)


def _assert_close(found: list, expected: list, rel: float) -> None:
    assert len(found) == len(expected) and found
    for a, b in zip(found, expected, strict=True):
        assert (a["prompts"], a["layer"], a["alpha"], a["n_tokens"]) == (b["prompts"], b["layer"], b["alpha"],
                                                                         b["n_tokens"])
        numbers = {key: value for key, value in a.items() if isinstance(value, float)}
        assert numbers == pytest.approx({key: b[key] for key in numbers}, rel=rel, abs=1e-7)


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, str, str, int]]:
    """Every module the stream reads from a checkpoint: (phase, role, module path, bytes read), the
    phase ``steering`` inside the steering check, else ``core``."""
    found, phase = [], ["core"]
    load, steer = StreamedModel.load, stream_engine.steer_streamed

    def recording(self, path):
        before = self.checkpoint.bytes_read
        module = load(self, path)
        found.append((phase[0], self.role, path, self.checkpoint.bytes_read - before))
        return module

    def steering(*args, **kwargs):
        phase[0] = "steering"
        try:
            steer(*args, **kwargs)
        finally:
            phase[0] = "core"

    monkeypatch.setattr(StreamedModel, "load", recording)
    monkeypatch.setattr(stream_engine, "steer_streamed", steering)
    return found


def _read(loads: list, phase: str) -> list[tuple[str, str]]:
    return [(role, path) for at, role, path, _ in loads if at == phase]


def _bytes(loads: list, phase: str, role: str) -> int:
    return sum(n for at, who, _, n in loads if at == phase and who == role)


def test_stream_records_equal_resident_with_held_out_prompts(perturbed_llama, tmp_path, loads):
    base, sft, _ = perturbed_llama
    config = _config(base, sft, steer_layers=LAYERS, steer_alphas=ALPHAS, steer_prompts=_held_out(tmp_path),
                     shard_size=4)
    resident = run_comparison(config, preflight=_cpu("resident")).steering_records
    streamed = run_comparison(config, preflight=_cpu("stream"))
    assert streamed.provenance.schedule == "stream"
    assert {record["prompts"] for record in streamed.steering_records} == {"run", "held_out"}
    _assert_close(streamed.steering_records, resident, rel=1e-4)
    # The held-out prompts have no core pass: both checkpoints are read whole for them, once, in
    # the pass that also steers the run's two shards (whose branches read no more than that).
    blocks = [f"layers.{block}" for block in range(3)]
    assert _read(loads, "steering") == [("base", "embed_tokens"), ("sft", "embed_tokens"),
                                        *((role, path) for path in blocks for role in ("base", "sft"))]
    for role in ("base", "sft"):
        core = {path: n for at, who, path, n in loads if at == "core" and who == role}
        assert _bytes(loads, "steering", role) == sum(core[path] for path in ("embed_tokens", *blocks))


def test_steering_pass_reads_only_the_base_blocks_after_the_first_steered_layer(perturbed_llama, loads, caplog):
    base, sft, _ = perturbed_llama
    config = _config(base, sft, steer_layers=LAYERS, steer_alphas=ALPHAS, shard_size=4)
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        run_comparison(config, preflight=_cpu("stream"))
    assert _read(loads, "steering") == [("base", "layers.2")], "one read of block 2 for both shards' branches"
    steering = _bytes(loads, "steering", "base")
    assert steering == next(n for at, role, path, n in loads if (at, role, path) == ("core", "base", "layers.2"))
    assert _bytes(loads, "steering", "sft") == 0
    core = _bytes(loads, "core", "base")
    logger_line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("steering check: read"))
    assert f"base {steering / 2**30:.3f} GiB" in logger_line
    # Against the core run, which reads every block of both checkpoints once (for both shards).
    assert 0 < steering < core / 3
    loads.clear()
    run_comparison(config.replace(steer=False), preflight=_cpu("stream"))
    assert _bytes(loads, "core", "base") == core, "the core pass reads what it read without the check"


def test_passes_split_to_fit_memory_give_the_same_records(perturbed_llama, tmp_path, loads, monkeypatch, caplog):
    """One branch a pass: the held-out prompts streamed whole first, storing what their later passes
    start from; each later pass reads the blocks after its own layer (none after the last)."""
    base, sft, _ = perturbed_llama
    config = _config(base, sft, steer_layers=LAYERS, steer_alphas=ALPHAS, steer_prompts=_held_out(tmp_path),
                     shard_size=4)
    whole = run_comparison(config, preflight=_cpu("stream")).steering_records
    monkeypatch.setattr(stream_steering, "pass_budget", lambda job, models: 0)
    loads.clear()
    put = MemoryStore.put
    stored = []
    monkeypatch.setattr(MemoryStore, "put", lambda self, kind, value, **parts: (
        stored.append(parts) if kind is Kind.STATE and parts["shard"] == 2 else None, put(self, kind, value, **parts)))
    comparison, store = Comparison(config, preflight=_cpu("stream")), MemoryStore()
    with caplog.at_level(logging.INFO, logger="lens_compare"):
        comparison.run(store)
    assert any("in 13 pass(es)" in r.getMessage() for r in caplog.records), "the held-out unit, then 12 branches"
    _assert_close(comparison.assemble(store).steering_records, whole, rel=1e-6)
    assert stored == [{"role": role, "shard": 2, "state": state} for state, role in
                      ((2, "base"), (3, "base"), (3, "sft"))], "what the held-out unit's later passes start from"
    assert store.keys(Kind.STATE) == [], "every kept state dropped once its unit's sums are stored"
    held_out_pass = [("base", "embed_tokens"), ("sft", "embed_tokens"),
                     *((role, f"layers.{block}") for block in range(3) for role in ("base", "sft"))]
    # 3 units x 2 alphas at layer 1 read block 2; at layer 2 (the last) nothing.
    assert _read(loads, "steering") == held_out_pass + [("base", "layers.2")] * 6


def test_a_steering_pass_interrupted_between_units_resumes_with_the_missing_ones(perturbed_llama, tmp_path,
                                                                                   monkeypatch, loads):
    base, sft, _ = perturbed_llama
    config = _config(base, sft, steer_layers=LAYERS, steer_alphas=ALPHAS, steer_prompts=_held_out(tmp_path),
                     shard_size=2)
    clean = run_comparison(config, preflight=_cpu("stream")).steering_records
    units, died = [], []
    divergences = stream_steering.unit_divergences

    def dying(job, heads, real, last, branches, unsteered):
        unit = next(iter(branches)).unit
        if unit == 1 and not died:
            died.append(unit)
            raise KeyboardInterrupt
        units.append(unit)
        return divergences(job, heads, real, last, branches, unsteered)

    monkeypatch.setattr(stream_steering, "unit_divergences", dying)

    def comparison() -> Comparison:
        return Comparison(config, preflight=_cpu("stream"), held_in_memory=False)

    folder = open_run_folder(comparison(), tmp_path)
    with pytest.raises(KeyboardInterrupt):
        comparison().run(folder)
    assert units == [0] and [key.shard for key in folder.keys(Kind.STEERING)] == [0]
    # Unit 0's kept states are gone with its sums; shards 1 and 2 keep theirs: base after blocks 1
    # and 2, and both models' last state.
    kept = {(key.role, key.shard, key.state) for key in folder.keys(Kind.STATE)}
    assert kept == {(role, shard, state) for shard in (1, 2) for role, state in
                    (("base", 2), ("base", 3), ("sft", 3))}
    units.clear()
    loads.clear()
    resumed = comparison()
    again = open_run_folder(resumed, tmp_path)
    resumed.run(again)
    assert sorted(units) == [1, 2, 3], "only the units whose sums were missing"
    assert _read(loads, "core") == [("base", "norm"), ("sft", "norm")], "the heads alone: no shard streamed again"
    assert ("base", "layers.2") in _read(loads, "steering")
    assert not list((folder.path / "layers").rglob("*.safetensors"))
    _assert_close(resumed.assemble(again).steering_records, clean, rel=1e-6)


def test_steering_at_the_planted_block_explains_the_whole_fine_tune_on_stream(tmp_path):
    def fixed(model):  # the planted pair's seeded vector, as in tests/test_steering.py
        return torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(3))

    base, sft = planted_pair(tmp_path, 1, fixed, size=20.0)
    result = lens_compare.compare(base=str(base), sft=str(sft), prompts=PROMPTS[:4], bootstrap=0, logit_lens="all",
                                  steer=True, steer_layers=(0, 1), strategy="stream", check_memory=False)
    assert result.provenance.schedule == "stream"
    at = result.steering().set_index(["layer", "alpha"])
    assert at.loc[(1, 1.0), "kl_base"] > 1e-3, "the planted vector changes the output"
    assert at.loc[(1, 1.0), "fraction_kl"] == pytest.approx(1.0, abs=1e-6)
    assert at.loc[(1, 1.0), "top1_steered"] == 1.0
    assert at.loc[(1, 0.5), "fraction_kl"] < 0.99 and at.loc[(1, 2.0), "fraction_kl"] < 0.99
    assert at.loc[(0, 1.0), "fraction_kl"] == pytest.approx(0.0, abs=1e-6), "block 0 is the same in both"


def test_spill_counts_the_states_kept_for_the_check(perturbed_llama, tmp_path):
    base, sft, _ = perturbed_llama
    config = _config(base, sft, steer_layers=LAYERS, steer_alphas=ALPHAS, steer_prompts=_held_out(tmp_path),
                     shard_size=4)

    def spilled(config) -> tuple[int, object]:
        planned = Comparison(config, preflight=_cpu("stream"), held_in_memory=False).plan()
        return spill_bytes(planned.run, planned.job, planned.execution), planned

    steered, planned = spilled(config)
    plain, _ = spilled(RunConfig(base_model=str(base), sft_model=str(sft), prompts=PROMPTS, batch_size=2, bootstrap=0,
                                 logit_lens="all", shard_size=4))
    lengths, held = planned.run.tokenized.lengths, planned.run.held_out.lengths
    positions = sum((b - a) * max(lengths[a:b]) for a, b in planned.layout.bounds) + len(held) * max(held)
    # Base: states 2 and 3 (after blocks 1 and 2, the last); SFT: state 3. d_model 64, float32.
    assert steered - plain == positions * 3 * 64 * 4
