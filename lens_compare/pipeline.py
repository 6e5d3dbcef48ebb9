"""The pipeline: resolve -> tokenize -> load -> capture -> metrics, one model at a time or both.

Everything that can be checked without weights (references, files, tokenizers,
token ids, context lengths, layer indices, output directory) is checked before
the first checkpoint is loaded.
"""

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lens_compare.capture import ResidualStates, capture_states
from lens_compare.config import RunConfig
from lens_compare.errors import ConfigError, LensCompareError
from lens_compare.hooks import states_for_layers
from lens_compare.loading import (
    ModelRef,
    boot_bridge,
    context_length,
    load_config,
    load_hf_model,
    load_tokenizer,
    resolve_ref,
    weights_fingerprint,
)
from lens_compare.pairs import get_pair, load_pairs_file
from lens_compare.per_token import token_metrics
from lens_compare.preflight import local_run_approval
from lens_compare.result import ComparisonResult
from lens_compare.tokens import (
    UNTRAINED_NORM_RATIO,
    TokenizedPrompts,
    check_context,
    tokenize_prompts,
    untrained_token_ids,
)

logger = logging.getLogger("lens_compare")


@dataclass(frozen=True)
class Side:
    """One model of the pair as it will be loaded."""

    role: str
    ref: ModelRef
    dtype: str
    seed_id: str | None = None


@dataclass(frozen=True)
class LoadOverrides:
    """Per-run loading overrides (the local_run guard's approved entry)."""

    tokenizer: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    model_kwargs: dict[str, Any] | None = None


def resolve_sides(config: RunConfig) -> tuple[str, Side, Side, str | None]:
    """(pair label, base side, SFT side, registry note) without loading anything."""
    if config.pair and config.base_model:
        raise ConfigError("give a pair key or base_model/sft_model (--base/--sft), not both")
    if config.pair:
        extra = load_pairs_file(config.pairs_file) if config.pairs_file else None
        spec = get_pair(config.pair, extra)
        base = Side("base", resolve_ref(spec.base), spec.base_dtype or config.dtype, spec.seed_base)
        sft = Side("sft", resolve_ref(spec.sft), spec.sft_dtype or config.dtype, spec.seed_sft)
        return spec.key, base, sft, spec.note
    if config.base_model and config.sft_model:
        base = Side("base", resolve_ref(config.base_model), config.dtype)
        sft = Side("sft", resolve_ref(config.sft_model), config.dtype)
        return "custom", base, sft, None
    raise ConfigError("no models given: pass --pair KEY, or --base and --sft")


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device {device!r} is not 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return device


def select_layers(config: RunConfig, n_layers: int) -> tuple[int, ...]:
    if config.layers is not None:
        bad = [layer for layer in config.layers if layer >= n_layers]
        if bad:
            raise ConfigError(f"layers {bad} do not exist: the models have {n_layers} layers (0..{n_layers - 1})")
        return tuple(sorted(config.layers))
    if config.skip_first >= n_layers:
        raise ConfigError(f"skip_first {config.skip_first} leaves no layer of {n_layers} to capture")
    return tuple(range(config.skip_first, n_layers))


def read_prompts(config: RunConfig) -> tuple[str, ...]:
    """Prompts from the config or a file: .jsonl (``{"prompt": ...}`` per line) or text, one per line."""
    if config.prompts:
        return tuple(config.prompts)
    if not config.prompts_file:
        return ()
    path = Path(config.prompts_file)
    if not path.is_file():
        raise ConfigError(f"prompts file {str(path)!r} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return tuple(lines)
    import json

    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        text = record.get("prompt") if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise ConfigError(f'{path}:{number}: expected {{"prompt": "..."}} or a JSON string')
        prompts.append(text)
    return tuple(prompts)


def _versions() -> dict[str, str]:
    out = {}
    for package in ("lens_compare", "transformer-lens", "torch", "transformers"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


class _Loaded:
    """Load-once caches for configs and tokenizers keyed by reference (the sanity pair shares one)."""

    def __init__(self, overrides: LoadOverrides):
        self.overrides = overrides
        self.configs: dict[str, Any] = {}
        self.tokenizers: dict[str, Any] = {}

    def config(self, ref: ModelRef):
        if ref.spec not in self.configs:
            self.configs[ref.spec] = load_config(ref)
        return self.configs[ref.spec]

    def tokenizer(self, ref: ModelRef):
        if ref.spec not in self.tokenizers:
            self.tokenizers[ref.spec] = load_tokenizer(
                ref, self.overrides.tokenizer, **(self.overrides.tokenizer_kwargs or {})
            )
        return self.tokenizers[ref.spec]


@dataclass(frozen=True)
class PreparedRun:
    """Everything a run knows before any weights load."""

    config: RunConfig
    pair: str
    base: Side
    sft: Side
    device: str
    model_configs: dict[str, Any]
    layers: tuple[int, ...]
    tokenized: TokenizedPrompts
    tokenizers: dict[str, Any]
    overrides: LoadOverrides

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.base, self.sft

    def plan_facts(self) -> dict[str, Any]:
        """What the preflight (the hardware planner) needs to judge the run."""
        return {
            "pair": self.pair, "base": self.base, "sft": self.sft, "configs": self.model_configs,
            "device": self.device, "layers": self.layers,
            "n_prompts": len(self.tokenized.token_ids), "max_tokens": max(self.tokenized.lengths),
            "batch_size": self.config.batch_size, "strategy": self.config.strategy,
        }


def prepare_run(config: RunConfig, overrides: LoadOverrides | None = None) -> PreparedRun:
    """Resolve, validate and tokenize: every check that needs no weights, in order.

    When ``config.local_run`` is enabled, the seed's guard runs first and its approved
    entry's device, dtype, tokenizer and kwargs override the config.
    """
    overrides = overrides or LoadOverrides()
    pair_label, base, sft, note = resolve_sides(config)
    if note:
        logger.info("pair %s: %s", pair_label, note)
    approval = local_run_approval(config.local_run, base.ref.spec, sft.ref.spec)
    if approval is not None:
        config = config.replace(device=approval.device, dtype=approval.dtype)
        if approval.dtype:
            base, sft = replace(base, dtype=approval.dtype), replace(sft, dtype=approval.dtype)
        overrides = LoadOverrides(approval.tokenizer, approval.tokenizer_kwargs, approval.model_kwargs)
    device = resolve_device(config.device)
    prompts = read_prompts(config)
    cache = _Loaded(overrides)
    model_configs = {side.role: cache.config(side.ref) for side in (base, sft)}
    n_layers = model_configs["base"].num_hidden_layers
    if model_configs["sft"].num_hidden_layers != n_layers:
        raise ConfigError(
            f"the models differ in depth ({n_layers} vs {model_configs['sft'].num_hidden_layers} "
            "layers); they cannot be compared layer by layer"
        )
    layers = select_layers(config, n_layers)
    tokenizers = {side.role: cache.tokenizer(side.ref) for side in (base, sft)}
    tokenized = tokenize_prompts(
        prompts, tokenizers["base"], tokenizers["sft"],
        chat_template=config.chat_template, n_tokens=config.tokens, filler_text=config.filler_text,
    )
    for side in (base, sft):
        check_context(tokenized, context_length(model_configs[side.role]), f"{side.role} model {side.ref}")
    return PreparedRun(config, pair_label, base, sft, device, model_configs, layers, tokenized,
                       tokenizers, overrides)


@dataclass(frozen=True)
class Captured:
    """Both models' residual states plus what was learnt from their weights while loaded."""

    states: dict[str, ResidualStates]
    fingerprints: dict[str, str]
    untrained: dict[int, float]


def capture_pair(run: PreparedRun, strategy: str) -> Captured:
    """Load each model once and push every prompt through it.

    ``resident`` keeps both models loaded; ``sequential`` frees each before loading
    the next, so only one model's weights are in memory at a time.
    """
    if strategy not in ("resident", "sequential"):
        raise LensCompareError(f"strategy {strategy!r} is not run by the core pipeline (resident, sequential)")
    token_ids, real = run.tokenized.padded(_pad_id(run.tokenizers["base"]))
    states = states_for_layers(run.layers)
    seen_ids = {t for ids in run.tokenized.token_ids for t in ids}
    captured = Captured({}, {}, {})

    def load(side: Side):
        logger.info("loading %s model %s (%s) in %s on %s", side.role, side.ref, side.ref.kind, side.dtype, run.device)
        hf_model = load_hf_model(side.ref, run.model_configs[side.role], side.dtype, run.device,
                                 run.overrides.model_kwargs)
        captured.fingerprints[side.role] = weights_fingerprint(hf_model)
        if side.role == "base":
            captured.untrained.update(untrained_token_ids(hf_model.get_input_embeddings().weight, seen_ids))
        return boot_bridge(hf_model, side.ref, run.tokenizers[side.role], side.dtype, run.device)

    def capture(side: Side, bridge) -> None:
        captured.states[side.role] = capture_states(
            bridge, token_ids, real, states, batch_size=run.config.batch_size, label=side.role
        )
        progress.update()

    progress = tqdm(total=2, desc="models", unit="model", leave=False)
    if strategy == "resident":
        bridges = [(side, load(side)) for side in run.sides]
        for side, bridge in bridges:
            capture(side, bridge)
        del bridges
    else:
        for side in run.sides:
            bridge = load(side)
            capture(side, bridge)
            del bridge
            gc.collect()
            if run.device.startswith("cuda"):
                torch.cuda.empty_cache()
    progress.close()
    return captured


def _pad_id(tokenizer) -> int:
    # Right padding is masked out of every metric, so any id in the vocabulary will do.
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def run_comparison(
    config: RunConfig,
    *,
    overrides: LoadOverrides | None = None,
    preflight: Callable[[dict[str, Any]], str] | None = None,
    keep_residuals: bool = False,
) -> ComparisonResult:
    """Run one comparison as ``config`` describes and return the result (nothing is written).

    ``preflight`` gets ``PreparedRun.plan_facts()`` before any weights are loaded; it
    returns the strategy to use (``resident`` or ``sequential``) or raises to refuse
    the run (``lens_compare.preflight.memory_preflight`` asks the hardware planner).
    Without one, ``strategy: auto`` runs sequentially.
    """
    run = prepare_run(config, overrides)
    strategy = preflight(run.plan_facts()) if preflight is not None else run.config.strategy
    if strategy == "auto":
        strategy = "sequential"
    captured = capture_pair(run, strategy)
    tokenizer = run.tokenizers["base"]
    if captured.untrained:
        logger.warning(
            "the base model's embedding rows look untrained for %s (row norm / median < %s); "
            "residuals at these positions are outliers, marked base_untrained in the outputs",
            ", ".join(f"{tokenizer.convert_ids_to_tokens(t)!r} (id {t})" for t in captured.untrained),
            UNTRAINED_NORM_RATIO,
        )
    base_states, sft_states = captured.states["base"], captured.states["sft"]
    return ComparisonResult(
        provenance=_provenance(run, strategy, captured),
        layers=run.layers,
        tokens=run.tokenized,
        token_strings=tuple(tuple(tokenizer.convert_ids_to_tokens(list(ids))) for ids in run.tokenized.token_ids),
        untrained_base_tokens=captured.untrained,
        real_tokens=run.tokenized.padded(0)[1],
        metrics=token_metrics(base_states, sft_states, run.layers),
        include_first_token=run.config.include_first_token,
        residuals=(base_states, sft_states) if keep_residuals else None,
    )


def _provenance(run: PreparedRun, strategy: str, captured: Captured) -> dict[str, Any]:
    tokenizer = run.tokenizers["base"]
    return {
        "versions": _versions(),
        "pair": run.pair,
        "base_model": _side_provenance(run.base, captured.fingerprints),
        "sft_model": _side_provenance(run.sft, captured.fingerprints),
        "dtype": {"base": run.base.dtype, "sft": run.sft.dtype},
        "device": run.device,
        "strategy": strategy,
        "n_layers": run.model_configs["base"].num_hidden_layers,
        "d_model": int(captured.states["base"].values.shape[-1]),
        "layers": list(run.layers),
        "chat_template": run.tokenized.chat_template,
        "prompts": list(run.tokenized.prompts),
        # What was tokenized, when a chat template (or filler text) changed the prompts.
        "texts": list(run.tokenized.texts) if run.tokenized.texts != run.tokenized.prompts else None,
        "token_ids": [list(ids) for ids in run.tokenized.token_ids],
        "untrained_base_tokens": [
            {"id": t, "token": tokenizer.convert_ids_to_tokens(t), "norm_over_median": round(r, 6)}
            for t, r in captured.untrained.items()
        ],
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": run.config.to_dict(),
    }


def _side_provenance(side: Side, fingerprints: dict[str, str]) -> dict[str, Any]:
    return {
        "reference": side.ref.spec,
        "kind": side.ref.kind,
        "location": side.ref.location,
        "gguf_file": side.ref.gguf_file,
        "seed_id": side.seed_id,
        "dtype": side.dtype,
        "weights_sha256_16": fingerprints.get(side.role),
    }
