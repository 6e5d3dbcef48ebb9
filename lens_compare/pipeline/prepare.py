"""Everything a run knows before any weights load: the two sides, layers, prompts and token ids.

Everything that can be checked without weights (references, files, tokenizers,
token ids, context lengths, layer indices) is checked here, before the first
checkpoint is loaded.
"""

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from lens_compare.analyses.difference_lens import DifferenceLens, choose_difference_lens, describe
from lens_compare.analyses.lens_choice import OFF, LensChoice, choose_logit_lens
from lens_compare.config import RunConfig
from lens_compare.errors import ConfigError, TokenizationError
from lens_compare.hardware.steering import SteeringChoice
from lens_compare.metrics.aggregate import aggregated_positions, token_mask
from lens_compare.models.loading import (
    ModelRef,
    context_length,
    load_config,
    load_tokenizer,
    resolve_ref,
)
from lens_compare.models.pairs import get_pair, load_pairs_file
from lens_compare.models.refs import Side
from lens_compare.models.tokens import TokenizedPrompts, check_context, tokenize_prompts
from lens_compare.pipeline.execution import PlanFacts
from lens_compare.pipeline.preflight import local_run_approval

logger = logging.getLogger("lens_compare")


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
        base = Side("base", resolve_ref(spec.base), spec.base_dtype or config.dtype, spec.seed_base,
                    spec.base_quantization)
        sft = Side("sft", resolve_ref(spec.sft), spec.sft_dtype or config.dtype, spec.seed_sft,
                   spec.sft_quantization)
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


def resolve_gpus(requested: tuple[int, ...] | None, device: str) -> tuple[int, ...]:
    """The CUDA devices a run may use: ``requested`` (``--gpus``), else ``cuda:N``'s N, else all visible."""
    if not device.startswith("cuda"):
        if requested:
            raise ConfigError(
                f"--gpus {','.join(map(str, requested))} was given but the run's device is {device!r}; "
                "add --device cuda (or drop --gpus)"
            )
        return ()
    visible = torch.cuda.device_count()
    index = device.partition(":")[2]
    if index:
        if requested and tuple(requested) != (int(index),):
            raise ConfigError(
                f"--device {device} and --gpus {','.join(map(str, requested))} disagree; "
                "give --device cuda with --gpus, or --device cuda:N alone"
            )
        requested = (int(index),)
    gpus = tuple(requested) if requested else tuple(range(visible))
    missing = [gpu for gpu in gpus if gpu >= visible]
    if missing:
        raise ConfigError(
            f"--gpus names cuda:{missing[0]}, which does not exist: this machine has {visible} CUDA "
            f"device(s) (0..{visible - 1})"
        )
    return gpus


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
    return read_prompt_file(config.prompts_file, "prompts file")


def read_prompt_file(name: str, what: str) -> tuple[str, ...]:
    """The prompts of a file: .jsonl (``{"prompt": ...}`` per line) or text, one per line; ``what``
    names the file in errors (``prompts file``, ``--steer-prompts file``)."""
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"{what} {str(path)!r} holds no prompts (it is empty or blank); "
                          + ("one JSON object per line, like {\"prompt\": \"...\"}" if path.suffix == ".jsonl"
                             else "one prompt per line"))
    if path.suffix != ".jsonl":
        return tuple(lines)
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
    gpus: tuple[int, ...]
    model_configs: dict[str, Any]
    layers: tuple[int, ...]
    tokenized: TokenizedPrompts
    tokenizers: dict[str, Any]
    overrides: LoadOverrides
    # Where the logit lens runs (``config.logit_lens`` resolved: see lens_compare.analyses.lens_choice).
    logit_lens: LensChoice = OFF
    # The difference lens (``config.difference_lens`` resolved: lens_compare.analyses.difference_lens).
    difference_lens: DifferenceLens = DifferenceLens(None, "off")
    # The steering check's held-out prompts (``--steer-prompts``), tokenized as the run's are; None for none.
    held_out: TokenizedPrompts | None = None
    # The steering check (``config.steer`` resolved once the run's engine is known, in
    # lens_compare.pipeline.steps.start_run: lens_compare.hardware.steering).
    steering: SteeringChoice = SteeringChoice(None, "not decided yet")

    @property
    def sides(self) -> tuple[Side, Side]:
        return self.base, self.sft

    @property
    def fed_tokenizer(self):
        """The tokenizer whose ids both models see (``--tokenizer``): it names every token in the outputs."""
        return self.tokenizers[self.tokenized.tokenizer]

    def pad_id(self) -> int:
        """The id prompts are right-padded with: the fed tokenizer's pad (or EOS) token, if both
        models have an embedding row for it. Padding is masked out of every metric, so any such id
        will do; an SFT tokenizer's pad token may be one it added, beyond the base model's rows."""
        rows = _embedding_rows(self.model_configs)
        fewest = min(rows.values()) if rows else None
        for candidate in (self.fed_tokenizer.pad_token_id, self.fed_tokenizer.eos_token_id):
            if candidate is not None and (fewest is None or candidate < fewest):
                return candidate
        return 0

    def plan_facts(self) -> PlanFacts:
        """What the preflight (the hardware planner) needs to judge the run."""
        return PlanFacts(
            pair=self.pair, base=self.base, sft=self.sft, configs=self.model_configs,
            device=self.device, gpus=self.gpus, layers=self.layers,
            n_prompts=len(self.tokenized.token_ids), max_tokens=max(self.tokenized.lengths),
            batch_size=self.config.batch_size, strategy=self.config.strategy,
            model_kwargs=self.overrides.model_kwargs, components=self.config.components,
            logit_lens=self.logit_lens.on, lens_layers=len(self.logit_lens.layers),
            lens_mode=self.logit_lens.mode,
            cka_tokens=self.aggregated_tokens() if self.config.cka else 0,
            noise_floor=self.config.noise_floor,
        )

    def aggregated_tokens(self) -> int:
        """Real tokens the per-layer aggregates (and CKA) cover: position 0 left out unless included."""
        return _aggregated_tokens(self.tokenized, self.config.include_first_token)


def _aggregated_tokens(tokenized: TokenizedPrompts, include_first_token: bool) -> int:
    _, real = tokenized.padded(pad_id=0)  # the pad id does not change which tokens are real
    return int(token_mask(real, aggregated_positions(include_first_token)).sum())


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
    if config.gpus and config.device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(
            f"--gpus {','.join(map(str, config.gpus))} needs CUDA devices, and CUDA is not available "
            "here; drop --gpus (and --device cuda) to run on the CPU"
        )
    device = resolve_device(config.device)
    gpus = resolve_gpus(config.gpus, device)
    prompts = read_prompts(config)
    if not prompts:  # before any config or tokenizer is read
        raise TokenizationError("no prompts given: pass --prompt TEXT or --prompts-file FILE")
    cache = _Loaded(overrides)
    model_configs = {side.role: cache.config(side.ref) for side in (base, sft)}
    n_layers = model_configs["base"].num_hidden_layers
    if model_configs["sft"].num_hidden_layers != n_layers:
        raise ConfigError(
            f"the models differ in depth ({n_layers} vs {model_configs['sft'].num_hidden_layers} "
            "layers); they cannot be compared layer by layer"
        )
    layers = select_layers(config, n_layers)
    if config.tokens is not None:  # before the prompts are extended to that length
        for side in (base, sft):
            context = context_length(model_configs[side.role])
            if context is not None and config.tokens > context:
                raise TokenizationError(
                    f"--tokens {config.tokens} is longer than the {side.role} model {side.ref}'s context of "
                    f"{context} tokens; use at most {context}"
                )
    tokenizers = {side.role: cache.tokenizer(side.ref) for side in (base, sft)}
    tokenized = tokenize_prompts(
        prompts, tokenizers["base"], tokenizers["sft"],
        chat_template=config.chat_template, n_tokens=config.tokens, filler_text=config.filler_text,
        tokenizer=config.tokenizer, vocab_sizes=_embedding_rows(model_configs),
    )
    for side in (base, sft):
        check_context(tokenized, context_length(model_configs[side.role]), f"{side.role} model {side.ref}")
    if _aggregated_tokens(tokenized, config.include_first_token) == 0:
        raise TokenizationError(
            f"every prompt is a single token ({', '.join(repr(p) for p in prompts[:3])}"
            f"{', ...' if len(prompts) > 3 else ''}), and position 0 is left out of the per-layer aggregates "
            "(the attention sink; it is reported on its own): nothing would be aggregated. Give longer prompts, "
            "or pass --include-first-token (include_first_token=True) to aggregate position 0"
        )
    dtypes = {"base": base.dtype, "sft": sft.dtype}
    logit_lens = choose_logit_lens(config.logit_lens, model_configs, tokenizers, layers,
                                   estimate=lambda: _lens_estimate(config, model_configs, dtypes, tokenized,
                                                                   device, gpus, layers))
    difference_lens = choose_difference_lens(config, logit_lens, layers, tokenized)
    _log_lens(logit_lens, difference_lens)
    held_out = None
    if config.steer_prompts:
        held_out = tokenize_prompts(
            read_prompt_file(config.steer_prompts, "--steer-prompts file"), tokenizers["base"], tokenizers["sft"],
            chat_template=config.chat_template, n_tokens=config.tokens, filler_text=config.filler_text,
            tokenizer=config.tokenizer, vocab_sizes=_embedding_rows(model_configs),
        )
        for side in (base, sft):
            check_context(held_out, context_length(model_configs[side.role]), f"{side.role} model {side.ref}")
        if _aggregated_tokens(held_out, include_first_token=False) == 0:
            raise TokenizationError("--steer-prompts: every held-out prompt is a single token, and the steering "
                                    "check compares the rest tokens (position 0 left out); give longer prompts")
    return PreparedRun(config, pair_label, base, sft, device, gpus, model_configs, layers, tokenized,
                       tokenizers, overrides, logit_lens, difference_lens, held_out)


def _embedding_rows(model_configs: dict[str, Any]) -> dict[str, int] | None:
    """Each model's input embedding rows by role (its config's ``vocab_size``); None if a config lacks it."""
    sizes = {role: getattr(config, "vocab_size", None) for role, config in model_configs.items()}
    return None if None in sizes.values() else {role: int(size) for role, size in sizes.items()}


def _lens_estimate(config: RunConfig, model_configs: dict[str, Any], dtypes: dict[str, str],
                   tokenized: TokenizedPrompts, device: str, gpus: tuple[int, ...],
                   layers: tuple[int, ...]) -> dict[str, float] | None:
    """The planner's seconds for the two forward passes and for the logit lens, on the run's device."""
    from lens_compare.hardware.planner import lens_time_estimate
    from lens_compare.pipeline.preflight import machine_for

    return lens_time_estimate(model_configs, dtypes, machine_for(device, gpus), tokens=max(tokenized.lengths),
                              prompts=len(tokenized.token_ids), forward_batch=config.batch_size, layers=len(layers))


def _log_lens(choice: LensChoice, difference: DifferenceLens) -> None:
    """One line for both lenses (the difference lens reads through the logit lens's heads)."""
    if choice.on:
        where = "at every captured layer" if choice.mode == "all" else \
            "at the output only: each model's actual next-token distribution" if choice.mode == "final" else \
            f"at layers {', '.join(map(str, choice.layers))}"
        logger.info("logit lens %s (--logit-lens %s: %s); %s", where, choice.requested, choice.reason,
                    describe(difference))
    elif difference.requested is not False:
        logger.info("%s", describe(difference))
    if choice.vocabulary is not None:
        logger.info("logit lens: %s", choice.vocabulary["note"])
