"""Every run option, declared once: the ``residual_compare:`` config block, the CLI's flags,
``compare()``'s keywords and the run fingerprint's exclusions are all read off ``RunConfig``.

A field's ``option(...)`` metadata says how it meets the user (``Option``): its help text, its
flag, its keyword in ``compare()``, whether it only changes what is written. Unknown keys and
wrong types are refused with the key's path; every problem is reported in one error.
``DEV_MODE=true`` selects ``configs/dev_config.yaml``, otherwise ``configs/prod_config.yaml`` (as
in the seed's script); CLI flags override config values.

Adding an option is one field here plus the code that uses it:

>>> @dataclass(frozen=True)
... class Example:
...     tokens: int | None = option(None, "make every prompt exactly N tokens", metavar="N")
"""

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lens_compare.errors import ConfigError
from lens_compare.util.choices import ChatTemplateName, Dtype, ExportFormat, StrategyChoice, TokenizerName
from lens_compare.util.files import read_structured

BLOCK = "residual_compare"
LENS_MODES = ("auto", "all", "final", "off")


def parse_lens_spec(value: Any, path: str = "logit_lens") -> str:
    """The ``logit_lens`` option in its one written form: a mode, or layers joined by commas.

    >>> parse_lens_spec(True), parse_lens_spec(None), parse_lens_spec([0, 8, "last"])
    ('all', 'auto', '0,8,last')
    """
    if value is None:
        return "auto"
    if value is True:
        return "all"
    if value is False:
        return "off"
    if isinstance(value, (list, tuple)):
        value = ",".join(str(item) for item in value)
    if not isinstance(value, str):
        raise ConfigError(f"{path}: expected one of {', '.join(LENS_MODES)} or layers like 0,8,16,last; "
                          f"got {value!r}")
    text = value.strip().lower()
    if text in LENS_MODES:
        return text
    items = [item.strip() for item in text.split(",")]
    if not items or any(not (item == "last" or item.isdigit()) for item in items):
        raise ConfigError(f"{path}: {value!r} is neither one of {', '.join(LENS_MODES)} nor comma-separated "
                          "layers like 0,8,16,last")
    return ",".join(items)


@dataclass(frozen=True)
class Option:
    """How one ``RunConfig`` field meets the user.

    ``flag``: the CLI flag (``""``: ``--`` and the name with dashes; None: config file only).
    ``keyword``: its name in ``compare()`` (``""``: the field's; None: not a keyword there).
    ``output_only``: it changes what is written, not the numbers: left out of a run's fingerprint,
    so a run folder is reused across it. ``replaces``: fields a given value resets to their
    defaults (a pair replaces base/sft models). ``normalize``: turns any accepted spelling into the
    stored one before type checks. ``cli``: extra ``argparse`` keywords; ``off_flag``: a flag that
    stores ``off_value``. ``accumulates``: a given list adds to the configured one.
    """

    help: str
    flag: str | None = ""
    keyword: str | None = ""
    output_only: bool = False
    metavar: str | None = None
    replaces: tuple[str, ...] = ()
    normalize: Callable[[Any, str], Any] | None = None
    cli: dict[str, Any] = dataclasses.field(default_factory=dict)
    off_flag: str | None = None
    off_value: Any = None
    accumulates: bool = False


def option(default: Any, help: str, **spec: Any) -> Any:
    """A ``RunConfig`` field with its ``Option`` (see there)."""
    return dataclasses.field(default=default, metadata={"option": Option(help, **spec)})


@dataclass(frozen=True)
class RunConfig:
    """Everything one comparison run needs. ``pair`` or both ``base_model``/``sft_model``."""

    pair: str | None = option(None, "registered pair key (see --list-pairs)",
                              replaces=("base_model", "sft_model"))
    base_model: str | None = option(None, "base model: hub id, save_pretrained directory or .gguf file",
                                    flag="--base", keyword="base", replaces=("pair",))
    sft_model: str | None = option(None, "SFT model: hub id, save_pretrained directory or .gguf file",
                                   flag="--sft", keyword="sft", replaces=("pair",))
    pairs_file: str | None = option(None, "YAML file declaring extra pairs")
    prompts: tuple[str, ...] = option((), "a prompt (repeatable on the command line)", flag="--prompt",
                                      replaces=("prompts_file",), cli={"action": "append"})
    prompts_file: str | None = option(
        None, 'prompts, one per line (.txt) or {"prompt": ...} per line (.jsonl)', replaces=("prompts",))
    tokens: int | None = option(None, "make every prompt exactly N tokens: longer ones are cut, shorter ones "
                                      "padded with --filler-text (else refused)", metavar="N")
    filler_text: str | None = option(None, "text appended, repeated, to prompts shorter than --tokens "
                                           "(e.g. 'The history of science')", metavar="TEXT")
    chat_template: ChatTemplateName = option("none", "wrap each prompt in the SFT model's chat template (sft) "
                                                     "or not (none)")
    tokenizer: TokenizerName = option(
        "base", "whose tokenizer gives the ids both models see: base (the SFT tokenizer must give the same ids), "
                "or sft (an SFT tokenizer with added tokens: every id must be within the base model's embedding "
                "rows)")
    dtype: Dtype = option("float32", "the precision both models run in")
    device: str = option("cpu", "cpu, cuda, cuda:N or auto")
    gpus: tuple[int, ...] | None = option(
        None, "CUDA devices to split models over, e.g. 0,1,2,3 (default: every visible one); naming GPUs "
              "asks for device cuda", metavar="0,1,2,3", output_only=True)
    layers: tuple[int, ...] | None = option(None, "layer indices to capture, e.g. 0,5,10 (default: all)",
                                            metavar="0,5,10", replaces=("skip_first",))
    skip_first: int = option(0, "do not capture the first K layers", metavar="K")
    include_first_token: bool = option(False, "include position 0 in the per-layer aggregates",
                                       output_only=True)
    bootstrap: int = option(1000, "resamples of the 95% bootstrap interval of every per-layer mean "
                                  "(0: none)", metavar="N", output_only=True)
    seed: int = option(0, "seed of the bootstrap resamples (recorded in the provenance)", output_only=True)
    components: bool = option(True, "also compare each block's attention and MLP outputs")
    logit_lens: str = option(
        "auto", "compare what each layer predicts through both models' final norm and unembedding: all (the "
                "flag alone), final (the models' outputs only), layers like 0,8,16,last, off, or auto (every "
                "layer when that costs at most a quarter of the forward passes, else final); a config also "
                "takes true/false/null and a list of layers",
        metavar="MODE", normalize=parse_lens_spec, cli={"nargs": "?", "const": "all"},
        off_flag="--no-logit-lens", off_value="off")
    difference_lens: bool | None = option(
        None, "read the mean SFT-minus-base shift of resid_post at every captured layer, per token class (rest, "
              "first_content, template), through each model's final norm and unembedding: the tokens it "
              "promotes and suppresses (default: on wherever the logit lens runs)")
    difference_lens_top: int = option(10, "tokens the difference lens lists per layer, class and reading, "
                                          "promoted and suppressed each", metavar="K")
    difference_lens_first: int = option(5, "the difference lens's first_content class: each prompt's first K "
                                           "content tokens (0: no such class)", metavar="K")
    difference_lens_positions: int = option(
        5, "the difference lens also lists, per layer and class, the N tokens of the run's prompts whose "
           "SFT-minus-base difference has the largest cosine with the mean shift (0: none)", metavar="N")
    steer: bool | None = option(
        None, "the steering check: run the base model again with alpha times the difference lens's mean shift "
              "added to its stream after each of --steer-layers, and report how much of KL(p_sft || p_base) and "
              "of the top-1 disagreement it removes (one base forward per layer and alpha; default: on where the "
              "planner estimates it takes at most as long as the run itself, off otherwise and on the stream "
              "strategy)")
    steer_layers: tuple[int, ...] = option(
        (), "layers the steering check steers at (default: the verdict's spread of up to 5 captured layers)",
        metavar="1,4,8")
    steer_alphas: tuple[float, ...] = option((0.5, 1.0, 2.0), "the steering check's multiples of the mean shift",
                                             metavar="0.5,1,2")
    steer_prompts: str | None = option(
        None, "held-out prompts for the steering check, read as --prompts-file reads its file and tokenized as the "
              "run's prompts are: the mean shift comes from the run's prompts, and the check is also reported on "
              "these (records labelled held_out)", metavar="FILE")
    prefix_lengths: tuple[int, ...] = option(
        (), "shorter token lengths read off this run's capture (set by lens_compare's sweeps): the difference "
            "lens also sums and reads each one's first positions", flag=None, keyword=None)
    top_tokens: int = option(10, "list per layer the K tokens whose stream moved most (relative_l2; 0: none)",
                             metavar="K", output_only=True)
    cka: bool = option(False, "linear CKA (and its debiased estimator) between every base and every SFT "
                              "layer's resid_post; keeps every captured state until the end")
    noise_floor: bool = option(False, "run the SFT model once more in a second precision (float32 for a "
                                      "16-bit run, bfloat16 for float32) and report each layer's drift "
                                      "against that numerical noise (clears_noise)")
    batch_size: int = option(8, "prompts per forward pass")
    strategy: StrategyChoice = option("auto", "how to run the pair (auto: the planner's pick among resident, "
                                              "sequential and stream; nf4 only when asked)", output_only=True)
    shard_size: int | None = option(None, "prompts per shard, the unit of progress and resume (default: ~2 GiB "
                                          "of residuals; a streamed run resumes block by block within a shard)")
    save_residuals: bool = option(False, "also write the captured residuals to a .safetensors file",
                                  keyword=None)
    output_dir: str = option("outputs", "output directory", flag="--out", keyword=None, output_only=True)
    export: tuple[ExportFormat, ...] = option((), "also write the token and summary tables in this format",
                                              keyword=None, output_only=True, accumulates=True)
    local_run: dict[str, Any] | None = option(None, "the seed's local-GPU guard (see the docs' strategies page)",
                                              flag=None, keyword=None, output_only=True)
    config_file: str | None = option(None, "the file these values came from (set by lens_compare)",
                                     flag=None, keyword=None, output_only=True)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Any, path: str = BLOCK) -> "RunConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(data).__name__}")
        problems = []
        values = {}
        hints = typing.get_type_hints(cls)
        specs = {field.name: spec for field, spec in run_options()}
        for key, value in data.items():
            if key not in hints:
                close = difflib.get_close_matches(str(key), list(hints), n=1)
                problems.append(
                    f"{path}.{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
                )
                continue
            if specs[key].normalize is not None:
                try:
                    value = specs[key].normalize(value, f"{path}.{key}")
                except ConfigError as error:
                    problems.append(str(error))
                    continue
            problem = _type_problem(value, hints[key])
            if problem:
                problems.append(f"{path}.{key}: {problem}")
            else:
                values[key] = tuple(value) if isinstance(value, list) else value
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
        config = cls(**values)
        config.check(path)
        return config

    def replace(self, **changes: Any) -> "RunConfig":
        """A copy with ``changes`` applied and validated (``None`` values are ignored)."""
        merged = {**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        return RunConfig.from_dict(merged)

    def given(self, values: dict[str, Any], path: str = BLOCK) -> "RunConfig":
        """A copy with the options a user gave (a CLI's flags, ``compare()``'s keywords) applied on
        top: each one resets the fields it ``replaces``, and naming GPUs asks for device cuda unless
        a device was given too. Validated as a whole.

        >>> RunConfig(pair="smollm2-sanity").given({"base_model": "a", "sft_model": "b"}).pair is None
        True
        """
        merged = self.to_dict()
        defaults = RunConfig().to_dict()
        specs = run_options_by_name()
        for key in values:
            for other in specs[key].replaces if key in specs else ():
                if other not in values:
                    merged[other] = defaults[other]
        for key, value in values.items():
            accumulates = key in specs and specs[key].accumulates
            merged[key] = sorted({*merged[key], *value}) if accumulates else value
        if values.get("gpus") and "device" not in values and not str(merged["device"]).startswith("cuda"):
            merged["device"] = "cuda"
        return RunConfig.from_dict(merged, path)

    def differences(self) -> dict[str, Any]:
        """The values that differ from the built-in defaults (what a run logs at its start)."""
        defaults = RunConfig().to_dict()
        return {key: value for key, value in self.to_dict().items()
                if key != "config_file" and value != defaults[key]}

    def check(self, path: str = BLOCK) -> None:
        """Cross-field rules that types alone cannot express."""
        problems = []
        if self.tokens is not None and self.tokens < 1:
            problems.append(f"{path}.tokens: must be a positive integer, got {self.tokens}")
        if self.batch_size < 1:
            problems.append(f"{path}.batch_size: must be >= 1, got {self.batch_size}")
        if self.bootstrap < 0:
            problems.append(f"{path}.bootstrap: must be >= 0 resamples (0: no interval), got {self.bootstrap}")
        if self.top_tokens < 0:
            problems.append(f"{path}.top_tokens: must be >= 0 tokens per layer (0: none), got {self.top_tokens}")
        if self.difference_lens_top < 1:
            problems.append(f"{path}.difference_lens_top: must be >= 1 token, got {self.difference_lens_top}")
        if self.difference_lens_positions < 0:
            problems.append(f"{path}.difference_lens_positions: must be >= 0 tokens (0: none), "
                            f"got {self.difference_lens_positions}")
        if self.difference_lens_first < 0:
            problems.append(f"{path}.difference_lens_first: must be >= 0 tokens (0: no first_content class), "
                            f"got {self.difference_lens_first}")
        if self.prefix_lengths and (self.tokens is None or any(not 0 < n < self.tokens for n in self.prefix_lengths)):
            problems.append(f"{path}.prefix_lengths: each must be a length between 1 and tokens - 1 (tokens: "
                            f"{self.tokens}), got {list(self.prefix_lengths)}")
        if self.difference_lens and self.logit_lens == "off":
            problems.append(f"{path}.difference_lens: the difference lens reads through the heads the logit lens "
                            "loads, and the logit lens is off (--no-logit-lens); drop one of the two")
        if self.steer and self.difference_lens is False:
            problems.append(f"{path}.steer: the steering check adds the difference lens's mean shift, and the "
                            "difference lens is off (--no-difference-lens); drop one of the two")
        if self.steer and self.logit_lens == "off":
            problems.append(f"{path}.steer: the steering check needs the difference lens, which reads through the "
                            "logit lens's heads, and the logit lens is off (--no-logit-lens); drop one of the two")
        if self.steer_prompts and self.steer is False:
            problems.append(f"{path}.steer_prompts: held-out prompts are for the steering check, which is off "
                            "(steer: false); drop one of them")
        if not self.steer_alphas:
            problems.append(f"{path}.steer_alphas: give at least one multiple, e.g. 0.5,1,2")
        if self.shard_size is not None and self.shard_size < 1:
            problems.append(f"{path}.shard_size: must be >= 1 prompt, got {self.shard_size}")
        if self.gpus is not None and (
            not self.gpus or any(g < 0 for g in self.gpus) or len(set(self.gpus)) != len(self.gpus)
        ):
            problems.append(f"{path}.gpus: must be distinct CUDA indices like [0, 1], got {list(self.gpus)}")
        if self.skip_first < 0:
            problems.append(f"{path}.skip_first: must be >= 0, got {self.skip_first}")
        if self.layers is not None and self.skip_first:
            problems.append(f"{path}: give either layers or skip_first, not both")
        if self.layers is not None:
            if not self.layers:
                problems.append(f"{path}.layers: empty list; omit it to capture every layer")
            if any(layer < 0 for layer in self.layers) or len(set(self.layers)) != len(self.layers):
                problems.append(f"{path}.layers: must be distinct non-negative ints, got {list(self.layers)}")
        if (self.base_model is None) != (self.sft_model is None):
            problems.append(f"{path}: base_model and sft_model go together (give both, or a pair)")
        if self.prompts and self.prompts_file:
            problems.append(f"{path}: give prompts or prompts_file, not both")
        if problems:
            raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
        if self.local_run is not None:
            from lens_compare.hardware.local_run import LocalRunConfig

            LocalRunConfig.from_dict(self.local_run, f"{path}.local_run")


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (None if it does)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        problems = [_type_problem(value, option) for option in options if option is not type(None)]
        return None if any(p is None for p in problems) else problems[0]
    if origin is Literal:
        allowed = typing.get_args(hint)
        return None if value in allowed else f"{value!r} is not one of {list(allowed)}"
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if not isinstance(value, (list, tuple)):
            return f"expected a list, got {type(value).__name__} {value!r}"
        for index, item in enumerate(value):
            problem = _type_problem(item, item_hint)
            if problem:
                return f"item {index}: {problem}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else f"expected a mapping, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"expected an integer, got {type(value).__name__} {value!r}"
    if hint is bool:
        return None if isinstance(value, bool) else f"expected true/false, got {value!r}"
    if hint is str:
        return None if isinstance(value, str) else f"expected a string, got {type(value).__name__} {value!r}"
    return None




def run_options() -> Iterator[tuple[dataclasses.Field, Option]]:
    """Every ``RunConfig`` field with its ``Option``, in declaration order."""
    for field in dataclasses.fields(RunConfig):
        yield field, field.metadata["option"]


def run_options_by_name() -> dict[str, Option]:
    return {field.name: spec for field, spec in run_options()}


def keyword_options() -> dict[str, dataclasses.Field]:
    """``compare()``'s keywords: each one's field."""
    return {spec.keyword or field.name: field for field, spec in run_options() if spec.keyword is not None}


def fingerprinted(config: RunConfig) -> dict[str, Any]:
    """The options a run folder's fingerprint covers: all but the output-only ones."""
    return {field.name: value for (field, spec), value in zip(run_options(), config.to_dict().values(), strict=True)
            if not spec.output_only}


def default_config_path() -> Path | None:
    """The seed's rule: DEV_MODE=true -> dev config, else prod; looked up in ./configs."""
    name = "dev_config.yaml" if os.environ.get("DEV_MODE", "").lower() in ("1", "true", "yes") else "prod_config.yaml"
    path = Path("configs") / name
    return path if path.is_file() else None


def load_config_file(path: str | Path) -> RunConfig:
    """The run options of a YAML (or JSON) file with one top-level key, ``residual_compare:``."""
    config, _ = load_config_blocks(path)
    return config


def load_config_blocks(path: str | Path, others: tuple[str, ...] = ()) -> tuple[RunConfig, dict[str, dict[str, Any]]]:
    """The run options of ``path``'s ``residual_compare:`` block, and the blocks named in ``others``
    (a sweep file's ``sweep:``), each a mapping; every block may be left out but one must be there."""
    path = Path(path)
    data = read_structured(path, "config file", ConfigError)
    allowed = (BLOCK, *others)
    if not isinstance(data, dict) or not data or set(data) - set(allowed):
        found = list(data) if isinstance(data, dict) else type(data).__name__
        expected = f"exactly one top-level key {BLOCK!r}" if not others else f"top-level keys among {list(allowed)}"
        raise ConfigError(f"config file {str(path)!r}: expected {expected}, found {found}")
    blocks = {}
    for name in allowed:
        block = data.get(name) or {}
        if not isinstance(block, dict):
            raise ConfigError(f"config file {str(path)!r}: {name}: expected a mapping of keys, "
                              f"found {type(block).__name__}")
        blocks[name] = block
    block = blocks.pop(BLOCK)
    if "config_file" in block:
        raise ConfigError(f"config file {str(path)!r}: {BLOCK}.config_file is set by lens_compare, not in a file")
    return RunConfig.from_dict({**block, "config_file": str(path)}, BLOCK), blocks
