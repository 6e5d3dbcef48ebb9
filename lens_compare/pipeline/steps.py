"""The steps ``Comparison`` (``lens_compare.pipeline.comparison``) drives, each a function of
what the one before settled.

- ``start_run``: the prepared run (``prepare_run``: everything that needs no weights), its shard
  layout and its ``Execution`` (the preflight, that is the hardware planner: schedule, how each
  model loads, or a refusal), and with the engine known, the steering check's choice;
- ``make_job`` / ``run_manifest``: what the engines run and what a run folder is a fingerprint of;
- ``spill_bytes`` / ``check_spill_space``: the disk a run folder needs, refused before loading;
- ``build_demo_checkpoints``: a demo pair's fine-tune, when shards are about to run;
- ``assemble``: the result from a store's shards, its provenance and noise floor included.
"""

import logging
import resource
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lens_compare.analyses import ANALYSIS_KEYS
from lens_compare.analyses.cka import layer_cka
from lens_compare.analyses.difference_lens import add_sums
from lens_compare.analyses.difference_positions import spill_bytes as difference_spill_bytes
from lens_compare.analyses.steering import Steering, steering_records
from lens_compare.config import RunConfig, fingerprinted
from lens_compare.demo.fine_tune import demo_checkpoint
from lens_compare.engines import Job
from lens_compare.engines.shards import ShardLayout, default_shard_size, state_bytes_per_prompt
from lens_compare.engines.store import Kind, Store, stack_metrics, stack_states
from lens_compare.engines.stream_steering import steering_states
from lens_compare.errors import ConfigError, HardwareError
from lens_compare.hardware.planner import steering_time_estimate
from lens_compare.hardware.precision import floor_dtype
from lens_compare.hardware.steering import STREAM, SteeringChoice, decide, describe
from lens_compare.metrics.aggregate import aggregated_positions, token_mask
from lens_compare.metrics.bootstrap import Bootstrap
from lens_compare.metrics.per_token import hook_metrics
from lens_compare.models.demo_recipes import recipe_for
from lens_compare.models.facts import ModelFacts
from lens_compare.models.fingerprint import checkpoint_fingerprint, code_fingerprint, token_ids_fingerprint
from lens_compare.models.tokens import UNTRAINED_NORM_RATIO, readable_tokens
from lens_compare.pipeline.execution import Execution, PlanFacts, default_execution
from lens_compare.pipeline.preflight import machine_for
from lens_compare.pipeline.prepare import LoadOverrides, PreparedRun, prepare_run
from lens_compare.results.provenance import Provenance, floor_provenance
from lens_compare.results.result import DIFFERENCE_POSITIONS_COLUMNS, ComparisonResult
from lens_compare.util.choices import DTYPE_BYTES
from lens_compare.util.hooks import states_for_layers
from lens_compare.util.layers import spread_layers
from lens_compare.util.units import GIB
from lens_compare.util.versions import recorded_versions

logger = logging.getLogger("lens_compare")

Preflight = Callable[[PlanFacts], Execution]

def shard_layout(run: PreparedRun, streamed: bool = False) -> ShardLayout:
    """The run's shards: ``shard_size`` prompts each, or ~2 GiB of both models' states (a
    streamed run holds two states per model, not all of them)."""
    n_prompts = len(run.tokenized.token_ids)
    size = run.config.shard_size
    if size is None:
        per_prompt = state_bytes_per_prompt(
            2 if streamed else captured_per_position(run), max(run.tokenized.lengths), _d_model(run),
            tuple(DTYPE_BYTES[side.dtype] for side in run.sides),
        )
        size = default_shard_size(per_prompt, run.config.batch_size)
    return ShardLayout(n_prompts, min(size, n_prompts))


def component_layers(run: PreparedRun) -> tuple[int, ...]:
    """The blocks whose attention and MLP outputs are compared (``components``)."""
    return run.layers if run.config.components else ()


def run_states(run: PreparedRun) -> tuple[int, ...]:
    """The residual states a run captures: those of its layers' hooks, and for the logit lens each
    lensed layer's resid_post and the last state (the models' final distributions)."""
    states = set(states_for_layers(run.layers))
    if run.logit_lens.on:
        states.update(layer + 1 for layer in run.logit_lens.layers)
        states.add(run.model_configs["base"].num_hidden_layers)
    return tuple(sorted(states))


def lens_kept_states(run: PreparedRun) -> int:
    """States per model a streamed run keeps for the logit lens beyond the two it streams with (every
    lensed layer's resid_post but the last state, which is the newest anyway)."""
    last = run.model_configs["base"].num_hidden_layers
    return len({layer + 1 for layer in run.logit_lens.layers} - {last})


def stream_kept_states(run: PreparedRun) -> int:
    """States per model a streamed run holds beyond the two it streams with, in memory: the logit
    lens's (``lens_kept_states``) and, with ``--steer``, the base model's resid_post of each steered
    layer, which every shard keeps with both models' last state until the check has run (counted
    for both models, as the planner counts these)."""
    last = run.model_configs["base"].num_hidden_layers
    return len({layer + 1 for layer in (*run.logit_lens.layers, *steered_layers(run))} - {last})


def captured_per_position(run: PreparedRun) -> int:
    """Vectors of ``d_model`` a bridge capture holds per model and token: every distinct residual
    state, and each compared block's two sublayer outputs."""
    return len(run_states(run)) + 2 * len(component_layers(run))


def _d_model(run: PreparedRun) -> int:
    config = run.model_configs["base"]
    return int(getattr(config, "hidden_size", None) or config.n_embd)


def start_run(
    config: RunConfig,
    *,
    overrides: LoadOverrides | None = None,
    preflight: Preflight | None = None,
    held_in_memory: bool = True,
) -> tuple[PreparedRun, ShardLayout, Execution]:
    """Everything before the first weight is read: the prepared run, its shards and its execution.

    ``held_in_memory``: every prompt's states stay in RAM until the end (a ``MemoryStore``);
    otherwise only one shard's (a run folder spills to disk).
    """
    run = prepare_run(config, overrides)
    decide = preflight if preflight is not None else default_execution
    layout = shard_layout(run, streamed=config.strategy == "stream")
    facts = replace(run.plan_facts(), held_prompts=layout.n_prompts if held_in_memory else layout.size,
                    lens_kept_states=stream_kept_states(run) if held_in_memory else 0)
    execution = decide(facts)
    if execution.schedule == "stream" and config.strategy != "stream":
        # auto picked stream, whose shards hold two states per model: larger shards, planned once more
        # when that changes what a shard holds.
        streamed = shard_layout(run, streamed=True)
        if streamed.size != layout.size:
            facts = replace(facts, strategy="stream",
                            held_prompts=streamed.n_prompts if held_in_memory else streamed.size)
            execution = decide(facts)
        layout = streamed
    if config.noise_floor and any(options.quantization for options in execution.loads.values()):
        raise ConfigError(
            "--noise-floor measures a second float precision of the SFT model; this run quantizes it to NF4, whose "
            "noise is the quantization's: compare the model with its own NF4 copy instead (as the smollm2-nf4 pair "
            "does) and pass that run with --noise-floor-run"
        )
    return replace(run, steering=choose_steering(run, execution)), layout, execution


def build_demo_checkpoints(run: PreparedRun) -> None:
    """The demo checkpoints a run compares, fine-tuned on first use (minutes, then cached): called
    when shards are about to run, never while planning."""
    for side in run.sides:
        if side.ref.kind == "demo":
            demo_checkpoint(recipe_for(side.ref.spec))


def make_job(run: PreparedRun, layout: ShardLayout, execution: Execution, keep_states: bool) -> Job:
    token_ids, real = run.tokenized.padded(run.pad_id())
    choice = run.steering
    held_out = run.held_out if choice.on else None
    held_out_ids, held_out_real = held_out.padded(run.pad_id()) if held_out is not None else (None, None)
    steering = Steering(choice.layers, choice.alphas, choice.held_out_prompts) if choice.on else None
    return Job(sides=run.sides, model_configs=run.model_configs, tokenizers=run.tokenizers,
               prompt_ids=run.tokenized.token_ids, device=run.device, batch_size=run.config.batch_size,
               loads=execution.loads, layout=layout, states=run_states(run),
               keep_states=keep_states or run.config.noise_floor, token_ids=token_ids, real=real,
               component_layers=component_layers(run), lens_layers=run.logit_lens.layers,
               lens_chunk_bytes=execution.lens_chunk_bytes, lens_vocab=run.logit_lens.shared_vocab,
               difference=run.difference_lens if run.difference_lens.on else None,
               steering=steering, held_out_ids=held_out_ids, held_out_real=held_out_real,
               noise_floor=run.config.noise_floor, base_lacks=run.tokenized.base_lacks)


def steer_requested(config: RunConfig) -> bool | None:
    """The ``steer`` option as asked: held-out prompts (``--steer-prompts``) ask for the check too."""
    return True if config.steer is None and config.steer_prompts else config.steer


def choose_steering(run: PreparedRun, execution: Execution) -> SteeringChoice:
    """The steering check of a run (``lens_compare.hardware.steering``: auto weighs the planner's seconds on
    the run's device and engine), logged in one line. An explicit ``--steer`` (or ``--steer-prompts``)
    is refused before anything loads where it cannot run: without the difference lens, or at a layer
    it does not read."""
    config = run.config
    lens = run.difference_lens
    requested = steer_requested(config)
    if requested is False:
        return SteeringChoice(False, "--no-steer")
    if not lens.on or "rest" not in lens.positions:
        if requested:
            raise ConfigError(f"--steer adds the difference lens's mean shift over the rest tokens, and the "
                              f"difference lens is off here ({lens.reason}); drop --steer")
        choice = SteeringChoice(None, f"the difference lens is off ({lens.reason})")
    else:
        choice = _steerable(run, execution, requested)
    logger.info("%s", describe(choice))
    return choice


def _steerable(run: PreparedRun, execution: Execution, requested: bool | None) -> SteeringChoice:
    config = run.config
    lens = run.difference_lens
    outside = [layer for layer in config.steer_layers if layer not in lens.layers]
    if outside:
        raise ConfigError(f"--steer-layers {','.join(map(str, outside))}: not captured layers, so no mean shift is "
                          f"known there; pick from {','.join(map(str, lens.layers))}")
    if execution.schedule == "stream" and not requested:
        return SteeringChoice(None, STREAM)
    layers = tuple(sorted(set(config.steer_layers))) or spread_layers(lens.layers)
    held_out = len(run.held_out.token_ids) if run.held_out is not None else 0
    estimate = steering_time_estimate(
        run.model_configs, {side.role: side.dtype for side in run.sides}, machine_for(run.device, run.gpus),
        tokens=max(run.tokenized.lengths), prompts=len(run.tokenized.token_ids), forward_batch=config.batch_size,
        lens_layers=len(run.logit_lens.layers), schedule=execution.schedule, layers=layers,
        alphas=len(config.steer_alphas), held_out_prompts=held_out,
        quantization={role: options.quantization for role, options in execution.loads.items()})
    choice = decide(requested, layers, tuple(float(alpha) for alpha in config.steer_alphas), estimate)
    return replace(choice, held_out_prompts=held_out) if choice.on else choice


def steered_layers(run: PreparedRun) -> tuple[int, ...]:
    """The layers an explicit ``--steer`` (or ``--steer-prompts``) steers at, known before the plan
    (a streamed run's memory counts the states kept for them; ``auto`` leaves the check off on
    stream): ``--steer-layers``, or the verdict's spread of the difference lens's; none otherwise."""
    if not steer_requested(run.config) or not run.difference_lens.on:
        return ()
    return tuple(sorted(set(run.config.steer_layers))) or spread_layers(run.difference_lens.layers)


def run_manifest(run: PreparedRun, layout: ShardLayout, execution: Execution, keep_states: bool) -> dict[str, Any]:
    """What a run folder's name is a fingerprint of (see ``lens_compare.models.fingerprint``)."""
    config = fingerprinted(run.config)
    models = {
        side.role: {
            "reference": side.ref.spec,
            "fingerprint": checkpoint_fingerprint(side.ref),
            "dtype": side.dtype,
            "quantization": execution.loads[side.role].quantization,
        }
        for side in run.sides
    }
    return {
        "lens_compare": recorded_versions()["lens_compare"],
        "code_sha256_16": code_fingerprint(),
        "pair": run.pair,
        "config": config,
        "device": run.device.partition(":")[0],
        "models": models,
        "layers": list(run.layers),
        "logit_lens_layers": list(run.logit_lens.layers),
        "token_ids_sha256_16": token_ids_fingerprint(run.tokenized.token_ids),
        # The held-out prompts' ids (a file edited in place is another run).
        **({"held_out_token_ids_sha256_16": token_ids_fingerprint(run.held_out.token_ids)} if run.held_out else {}),
        "n_prompts": layout.n_prompts,
        "shard_size": layout.size,
        "keep_states": keep_states,
    }


def spill_bytes(run: PreparedRun, job: Job, execution: Execution) -> int:
    """Disk a run folder needs for spilled residual states, at most: the base model's for a
    sequential run, both models' when they are kept (``--save-residuals``), a streamed
    run's resume point (two states of both models while the newer one is written) and the states
    its steering check starts from (``steering_spill``; a sequential run's, the SFT model's last
    states), and the difference lens's spill for its top positions (every shard's, until the
    readings)."""
    streamed = execution.schedule == "stream"
    models = 2 if job.keep_states else (1 if execution.schedule == "sequential" else 0)
    d_model = _d_model(run)
    total = frontier = 0
    for start, stop in job.layout.bounds:
        width = max(run.tokenized.lengths[start:stop])
        per_state = (stop - start) * width * d_model
        # A streamed run keeps residual states only, a bridge run also the sublayer outputs.
        vectors = len(job.states) if streamed else captured_per_position(run)
        total += sum(vectors * per_state * DTYPE_BYTES[side.dtype] for side in run.sides[:models])
        # A streamed shard's frontier: two states of both models while the newer one is written, and
        # the states its logit lens reads at the shard's end.
        extra = 0 if job.keep_states else lens_kept_states(run)
        frontier = max(frontier, sum((2 + extra) * per_state * DTYPE_BYTES[side.dtype] for side in run.sides))
    lens = job.difference
    units = 0 if lens is None or not lens.ranks_positions else difference_spill_bytes(
        int(lens.masks.any(dim=0).sum()), len(lens.layers), d_model)
    targets = 0
    if job.steering is not None and execution.schedule == "sequential":
        # The SFT model's last state of every steering unit, kept from its pass until the base model's.
        lengths = [*run.tokenized.lengths, *(run.held_out.lengths if run.held_out is not None else ())]
        targets = len(lengths) * max(lengths) * d_model * DTYPE_BYTES[run.sft.dtype]
    return total + units + targets + (frontier + steering_spill(run, job) if streamed else 0)


def steering_spill(run: PreparedRun, job: Job) -> int:
    """The states a streamed run keeps for its steering check (``steering_states``), at most: every
    shard's until the check has run (unless ``--save-residuals`` keeps them anyway), and the
    held-out prompts' where their branches take more than one pass."""
    if job.steering is None:
        return 0
    kept = steering_states(job)
    per_position = _d_model(run) * sum(len(kept[side.role]) * DTYPE_BYTES[side.dtype] for side in run.sides)
    lengths = run.tokenized.lengths
    positions = 0 if job.keep_states else sum((stop - start) * max(lengths[start:stop])
                                              for start, stop in job.layout.bounds)
    if run.held_out is not None:
        positions += len(run.held_out.lengths) * max(run.held_out.lengths)
    return positions * per_position


def check_spill_space(run: PreparedRun, job: Job, execution: Execution, directory) -> None:
    """Refuse before loading when the output directory's disk cannot hold the spilled states."""
    import shutil

    need = spill_bytes(run, job, execution)
    existing = Path(directory).absolute()
    while not existing.exists():  # the output directory is created only once the run starts
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if need > free:
        raise HardwareError(
            f"refusing to start: this {execution.schedule} run spills up to {need / GIB:.1f} GiB of residual "
            f"states to {str(directory)!r}, which has {free / GIB:.1f} GiB free; capture fewer layers "
            "(--layers, --skip-first), fewer or shorter prompts, or use another --out"
        )


def assemble(
    run: PreparedRun, job: Job, execution: Execution, store: Store, *, keep_residuals: bool
) -> ComparisonResult:
    """The result from the store's shards: identical whether the run was interrupted or not."""
    width = job.token_ids.shape[1]
    per_state = stack_metrics([store.get(Kind.METRICS, shard=shard) for shard in range(job.layout.count)], width)
    analysis_metrics = {key: values for key, values in per_state.items() if key in ANALYSIS_KEYS}
    facts = {side.role: ModelFacts.from_dict(store.get(Kind.FACTS, role=side.role)) for side in run.sides}
    untrained = facts["base"].untrained
    tokenizer = run.fed_tokenizer
    _warn_untrained(tokenizer, untrained, run.tokenized.base_lacks)
    residuals = None
    if keep_residuals:
        residuals = tuple(
            stack_states([store.get(Kind.STATES, role=role, shard=shard) for shard in range(job.layout.count)], width)
            for role in ("base", "sft")
        )
    provenance = _provenance(run, job, execution, facts, untrained)
    token_strings = tuple(readable_tokens(tokenizer, ids) for ids in run.tokenized.token_ids)
    result = ComparisonResult(
        provenance=provenance,
        layers=run.layers,
        tokens=run.tokenized,
        token_strings=token_strings,
        untrained_base_tokens=untrained,
        real_tokens=job.real,
        metrics=hook_metrics(per_state, job.states, run.layers),
        include_first_token=run.config.include_first_token,
        residuals=residuals,
        bootstrap=Bootstrap(run.config.bootstrap, run.config.seed),
        analysis_metrics=analysis_metrics,
        cka=_layer_cka(run, job, store) if run.config.cka else None,
        noise_floor=noise_floor_result(run, job, store, width, provenance, token_strings) if job.noise_floor else None,
        analysis_layers={"components": component_layers(run), "logit_lens": run.logit_lens.layers},
        difference_lens_records=_difference_lens(run, job, store),
        difference_positions_records=_difference_positions(run, job, store),
        steering_records=_steering(job, store),
    )
    for warning in result.warnings():
        logger.warning(warning)
    return result


def _warn_untrained(tokenizer, untrained: dict[int, float], base_lacks: tuple[int, ...]) -> None:
    """One warning for the base rows whose norm says they are untrained, one for the ids fed that
    the base tokenizer lacks (--tokenizer sft), whose rows were never trained on those tokens."""
    def named(ids) -> str:
        return ", ".join(f"{readable_tokens(tokenizer, [t])[0]!r} (id {t}, row norm / median {untrained[t]:.3g})"
                         for t in ids)

    low = [t for t in untrained if t not in base_lacks]
    if low:
        logger.warning(
            "the base model's embedding rows look untrained for %s (row norm / median < %s); "
            "residuals at these positions are outliers, marked base_untrained in the outputs",
            ", ".join(f"{readable_tokens(tokenizer, [t])[0]!r} (id {t})" for t in low), UNTRAINED_NORM_RATIO,
        )
    lacked = [t for t in untrained if t in base_lacks]
    if lacked:
        logger.warning(
            "--tokenizer sft fed the base model ids its own tokenizer lacks: %s; its embedding rows for them were "
            "never trained on these tokens, so its states there (and the differences to the SFT model's) are "
            "not a reading of them; marked base_untrained in the outputs", named(lacked),
        )


def _difference_lens(run: PreparedRun, job: Job, store: Store) -> list[dict[str, Any]] | None:
    """The difference lens's records with their tokens' strings: the base tokenizer's for the
    ``base`` and ``logit_difference`` readings, the SFT tokenizer's for ``sft``."""
    if job.difference is None:
        return None
    records = store.get(Kind.DIFFERENCE_LENS)["records"]
    out = []
    for record in records:
        tokenizer = run.tokenizers["sft" if record["reading"] == "sft" else "base"]
        entry = dict(record)
        for direction in ("promoted", "suppressed"):
            ids = [item["token_id"] for item in record[direction]]
            entry[direction] = [{"token_id": item["token_id"], "token": token, "logit": item["logit"]}
                                for item, token in zip(record[direction], readable_tokens(tokenizer, ids), strict=True)]
        out.append(entry)
    return out


def _difference_positions(run: PreparedRun, job: Job, store: Store) -> list[dict[str, Any]] | None:
    """The difference lens's top positions with their tokens' strings, as the run's own tokens read
    (the tokenizer that gave the ids); None where it ranked none."""
    if job.difference is None:
        return None
    records = store.get(Kind.DIFFERENCE_LENS)["positions"]
    if records is None:
        return None
    tokens = readable_tokens(run.fed_tokenizer, [record["token_id"] for record in records])
    return [{key: token if key == "token" else record[key] for key in DIFFERENCE_POSITIONS_COLUMNS}
            for record, token in zip(records, tokens, strict=True)]


def _steering(job: Job, store: Store) -> list[dict[str, Any]] | None:
    """The steering check's records from every shard's sums, then the held-out prompts' (None where it
    did not run)."""
    if job.steering is None:
        return None
    units = job.steering_units()
    records = steering_records(add_sums(store.get(Kind.STEERING, shard=unit) for unit in units
                                        if not job.held_out(unit)),
                               job.steering.layers, job.steering.alphas, "run")
    for unit in units:
        if job.held_out(unit):
            records += steering_records(store.get(Kind.STEERING, shard=unit), job.steering.layers,
                                        job.steering.alphas, "held_out")
    return records


def _layer_cka(run: PreparedRun, job: Job, store: Store) -> dict[str, Any]:
    """CKA over the aggregates' tokens, each state read back from the store shard by shard."""
    mask = token_mask(job.real, aggregated_positions(run.config.include_first_token))
    masks = [mask[start:stop] for start, stop in job.layout.bounds]
    def shard_states(role: str, state: int):
        return (store.get(Kind.STATE, role=role, shard=shard, state=state) for shard in range(job.layout.count))

    return layer_cka(shard_states, run.layers, masks)


def noise_floor_result(run: PreparedRun, job: Job, store: Store, width: int, run_provenance: Provenance,
                       token_strings: tuple) -> ComparisonResult:
    """The noise floor as a result of its own: the SFT model (its run precision as "base") against
    itself in the second precision (as "sft"), with the residual metrics only."""
    per_state = stack_metrics([store.get(Kind.NOISE, shard=shard) for shard in range(job.layout.count)], width)
    second = floor_dtype(run.sft.dtype)
    return ComparisonResult(
        provenance=floor_provenance(run.sft.ref.spec, {"base": run.sft.dtype, "sft": second},
                                    run.model_configs["sft"].num_hidden_layers, run_provenance),
        layers=run.layers, tokens=run.tokenized,
        token_strings=token_strings,
        untrained_base_tokens={}, real_tokens=job.real, metrics=hook_metrics(per_state, job.states, run.layers),
        include_first_token=run.config.include_first_token, bootstrap=Bootstrap(run.config.bootstrap, run.config.seed),
    )


def summary_line(run: PreparedRun, execution: Execution, job: Job, seconds: float,
                 reused_seconds: float | None = None) -> str:
    """One line for the end of a run: prompts, tokens, wall time, peak memory, strategy.
    ``reused_seconds``: nothing ran, the run folder held every shard; the run's own time then."""
    peak_host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    took = f"{seconds:.1f} s" if reused_seconds is None else \
        f"reassembled from its run folder without loading a model (the run itself took {reused_seconds:.1f} s)"
    parts = [
        f"{len(run.tokenized.token_ids)} prompts",
        f"{sum(run.tokenized.lengths):,} tokens",
        took,
        f"peak host RSS {peak_host:.2f} GiB",
    ]
    if run.device.startswith("cuda") and torch.cuda.is_available():
        peaks = {gpu: torch.cuda.max_memory_allocated(gpu) / GIB for gpu in run.gpus}
        parts.append("peak GPU " + ", ".join(f"cuda:{g} {p:.2f} GiB" for g, p in peaks.items()))
    parts.append(f"strategy {execution.strategy} ({execution.schedule}, {job.layout.count} shard(s) "
                 f"of up to {job.layout.size} prompts)")
    return "done: " + ", ".join(parts)


def _provenance(run: PreparedRun, job: Job, execution: Execution, facts: dict[str, ModelFacts],
                untrained: dict[int, float]) -> Provenance:
    tokenizer = run.fed_tokenizer
    return Provenance(
        versions=recorded_versions(),
        pair=run.pair,
        base_model=_side_provenance(run.base, facts["base"]),
        sft_model=_side_provenance(run.sft, facts["sft"]),
        dtype={"base": run.base.dtype, "sft": run.sft.dtype},
        device=run.device,
        gpus=list(run.gpus),
        strategy=execution.strategy,
        schedule=execution.schedule,
        quantization={role: facts[role].quantization for role in ("base", "sft")},
        placement={role: facts[role].placement for role in ("base", "sft")},
        shards={"count": job.layout.count, "size": job.layout.size},
        n_layers=run.model_configs["base"].num_hidden_layers,
        model_types={role: run.model_configs[role].model_type for role in ("base", "sft")},
        d_model=facts["base"].d_model,
        layers=list(run.layers),
        chat_template=run.tokenized.chat_template,
        tokenizer=run.tokenized.tokenizer,
        prompts=list(run.tokenized.prompts),
        # What was tokenized, when a chat template (or filler text) changed the prompts.
        texts=list(run.tokenized.texts) if run.tokenized.texts != run.tokenized.prompts else None,
        token_ids=[list(ids) for ids in run.tokenized.token_ids],
        # With a chat template: 1 where a token is the user's content, 0 where the template wrote it.
        token_content=None if run.tokenized.content is None
        else [[int(flag) for flag in flags] for flags in run.tokenized.content],
        untrained_base_tokens=[
            {"id": t, "token": readable_tokens(tokenizer, [t])[0], "norm_over_median": round(r, 6),
             "in_base_tokenizer": t not in run.tokenized.base_lacks}
            for t, r in untrained.items()
        ],
        bootstrap={"resamples": run.config.bootstrap, "seed": run.config.seed},
        logit_lens=run.logit_lens.to_dict(),
        difference_lens=run.difference_lens.to_dict(),
        steering=run.steering.to_dict(),
        plan=execution.estimate,
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        config_file=run.config.config_file,
        config=run.config.to_dict(),
    )


def _side_provenance(side, facts: ModelFacts) -> dict[str, Any]:
    return {
        "reference": side.ref.spec,
        "kind": side.ref.kind,
        "location": side.ref.location,
        "gguf_file": side.ref.gguf_file,
        "seed_id": side.seed_id,
        "dtype": side.dtype,
        "weights_sha256_16": facts.weights_sha256_16,
    }
