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
from lens_compare.tokens import check_context, tokenize_prompts, untrained_token_ids

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


def run_comparison(
    config: RunConfig,
    *,
    overrides: LoadOverrides | None = None,
    preflight: Callable[[dict[str, Any]], str] | None = None,
    keep_residuals: bool = False,
) -> ComparisonResult:
    """Run one comparison as ``config`` describes and return the result (nothing is written).

    When ``config.local_run`` is enabled, the seed's guard runs first and its approved
    entry's device, dtype, tokenizer and kwargs override the config.
    ``preflight`` gets the plan facts (configs, token counts, dtypes, device,
    layers) before any weights are loaded; it returns the strategy to use
    (``resident`` or ``sequential``) or raises to refuse the run
    (``lens_compare.preflight.memory_preflight`` asks the hardware planner).
    """
    overrides = overrides or LoadOverrides()
    pair_label, base, sft, note = resolve_sides(config)
    if note:
        logger.info("pair %s: %s", pair_label, note)
    approval = local_run_approval(config.local_run, base.ref.spec, sft.ref.spec)
    if approval is not None:
        config = config.replace(device=approval.device, dtype=approval.dtype)
        if approval.dtype:
            base = replace(base, dtype=approval.dtype)
            sft = replace(sft, dtype=approval.dtype)
        overrides = LoadOverrides(approval.tokenizer, approval.tokenizer_kwargs, approval.model_kwargs)
    device = resolve_device(config.device)
    prompts = read_prompts(config)
    cache = _Loaded(overrides)
    configs = {side.role: cache.config(side.ref) for side in (base, sft)}
    n_layers = configs["base"].num_hidden_layers
    sft_layers = configs["sft"].num_hidden_layers
    if sft_layers != n_layers:
        raise ConfigError(f"the models differ in depth ({n_layers} vs {sft_layers} layers); they cannot be compared layer by layer")
    layers = select_layers(config, n_layers)
    tokenized = tokenize_prompts(
        prompts, cache.tokenizer(base.ref), cache.tokenizer(sft.ref),
        chat_template=config.chat_template, n_tokens=config.tokens, filler_text=config.filler_text,
    )
    for side in (base, sft):
        check_context(tokenized, context_length(configs[side.role]), f"{side.role} model {side.ref}")
    strategy = config.strategy
    if preflight is not None:
        strategy = preflight({
            "pair": pair_label, "base": base, "sft": sft, "configs": configs, "device": device,
            "layers": layers, "n_prompts": len(tokenized.token_ids), "max_tokens": max(tokenized.lengths),
            "batch_size": config.batch_size, "strategy": config.strategy,
        })
    if strategy == "auto":
        strategy = "sequential"
    tokenizer = cache.tokenizer(base.ref)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    token_ids, real = tokenized.padded(pad_id)
    states = states_for_layers(layers)

    fingerprints: dict[str, str] = {}
    untrained: dict[int, float] = {}
    captured: dict[str, ResidualStates] = {}

    def load(side: Side):
        logger.info("loading %s model %s (%s) in %s on %s", side.role, side.ref, side.ref.kind, side.dtype, device)
        hf_model = load_hf_model(side.ref, configs[side.role], side.dtype, device, overrides.model_kwargs)
        fingerprints[side.role] = weights_fingerprint(hf_model)
        if side.role == "base":
            untrained.update(untrained_token_ids(
                hf_model.get_input_embeddings().weight, {t for ids in tokenized.token_ids for t in ids}
            ))
        return boot_bridge(hf_model, side.ref, cache.tokenizer(side.ref), side.dtype, device)

    def capture(side: Side, bridge) -> None:
        captured[side.role] = capture_states(
            bridge, token_ids, real, states, batch_size=config.batch_size, label=side.role
        )

    progress = tqdm(total=2, desc="models", unit="model", leave=False)
    if strategy == "resident":
        bridges = {side.role: load(side) for side in (base, sft)}
        for side in (base, sft):
            capture(side, bridges[side.role])
            progress.update()
        del bridges
    elif strategy == "sequential":
        for side in (base, sft):
            bridge = load(side)
            capture(side, bridge)
            del bridge
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            progress.update()
    else:
        raise LensCompareError(f"strategy {strategy!r} is not run by the core pipeline (resident, sequential)")
    progress.close()

    if untrained:
        names = {t: tokenizer.convert_ids_to_tokens(t) for t in untrained}
        logger.warning(
            "the base model's embedding rows look untrained for %s (row norm / median < 0.05); "
            "residuals at these positions are outliers, marked base_untrained in the outputs",
            ", ".join(f"{names[t]!r} (id {t})" for t in untrained),
        )
    metrics = token_metrics(captured["base"], captured["sft"], layers)
    provenance = {
        "versions": _versions(),
        "pair": pair_label,
        "base_model": _side_provenance(base, fingerprints),
        "sft_model": _side_provenance(sft, fingerprints),
        "dtype": {"base": base.dtype, "sft": sft.dtype},
        "device": device,
        "strategy": strategy,
        "n_layers": n_layers,
        "d_model": int(captured["base"].values.shape[-1]),
        "layers": list(layers),
        "chat_template": tokenized.chat_template,
        "prompts": list(tokenized.prompts),
        "token_ids": [list(ids) for ids in tokenized.token_ids],
        "untrained_base_tokens": [
            {"id": t, "token": tokenizer.convert_ids_to_tokens(t), "norm_over_median": round(r, 6)}
            for t, r in untrained.items()
        ],
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.to_dict(),
    }
    return ComparisonResult(
        provenance=provenance,
        layers=layers,
        tokens=tokenized,
        token_strings=tuple(tuple(tokenizer.convert_ids_to_tokens(list(ids))) for ids in tokenized.token_ids),
        untrained_base_tokens=untrained,
        real_tokens=real,
        metrics=metrics,
        include_first_token=config.include_first_token,
        residuals=(captured["base"], captured["sft"]) if keep_residuals else None,
    )


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
