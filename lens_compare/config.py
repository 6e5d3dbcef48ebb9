"""The ``residual_compare:`` config block: one dataclass, strictly validated.

Unknown keys and wrong types are refused with the key's path; every problem is
reported in one error. ``DEV_MODE=true`` selects ``configs/dev_config.yaml``,
otherwise ``configs/prod_config.yaml`` (as in the seed's script); CLI flags
override config values.
"""

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lens_compare.analyses.lens_choice import parse_lens_spec
from lens_compare.errors import ConfigError
from lens_compare.files import read_structured

Dtype = Literal["float32", "bfloat16", "float16"]
Strategy = Literal["auto", "resident", "sequential", "nf4", "stream"]
ChatTemplateName = Literal["none", "sft"]
ExportFormat = Literal["parquet", "csv"]
BLOCK = "residual_compare"


@dataclass(frozen=True)
class RunConfig:
    """Everything one comparison run needs. ``pair`` or both ``base_model``/``sft_model``."""

    pair: str | None = None
    base_model: str | None = None
    sft_model: str | None = None
    pairs_file: str | None = None
    prompts: tuple[str, ...] = ()
    prompts_file: str | None = None
    tokens: int | None = None
    filler_text: str | None = None
    chat_template: ChatTemplateName = "none"
    dtype: Dtype = "float32"
    device: str = "cpu"
    # CUDA devices a run may split models over; None: every visible device.
    gpus: tuple[int, ...] | None = None
    layers: tuple[int, ...] | None = None
    skip_first: int = 0
    include_first_token: bool = False
    # Resamples of the 95% bootstrap interval of every per-layer mean (0: none), and its seed.
    bootstrap: int = 1000
    seed: int = 0
    # Compare each block's attention and MLP outputs too (the components analysis).
    components: bool = True
    # Where the logit lens runs: auto, all, final, off, or layers like "0,8,16,last"
    # (lens_compare.analyses.lens_choice; true/false/null and lists read as all/off/auto and layers).
    logit_lens: str = "auto"
    # Tokens listed per layer where the stream moved most (top_tokens; 0: none).
    top_tokens: int = 10
    # Linear CKA between every base and every SFT layer (resid_post); off by default.
    cka: bool = False
    # Run the SFT model once more in a second precision and report the noise floor.
    noise_floor: bool = False
    batch_size: int = 8
    strategy: Strategy = "auto"
    # Prompts per shard (the unit of progress and resume); None: ~2 GiB of residuals per shard.
    shard_size: int | None = None
    save_residuals: bool = False
    output_dir: str = "outputs"
    export: tuple[ExportFormat, ...] = ()
    local_run: dict[str, Any] | None = None
    # The file these values came from (the CLI sets it; None: built-in defaults and flags).
    config_file: str | None = None

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
        for key, value in data.items():
            if key == "logit_lens":  # true/false/null and a list of layers are other spellings of the modes
                try:
                    value = parse_lens_spec(value, f"{path}.{key}")
                except ConfigError as error:
                    problems.append(str(error))
                    continue
            if key not in hints:
                close = difflib.get_close_matches(str(key), list(hints), n=1)
                problems.append(
                    f"{path}.{key}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
                )
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


def default_config_path() -> Path | None:
    """The seed's rule: DEV_MODE=true -> dev config, else prod; looked up in ./configs."""
    name = "dev_config.yaml" if os.environ.get("DEV_MODE", "").lower() in ("1", "true", "yes") else "prod_config.yaml"
    path = Path("configs") / name
    return path if path.is_file() else None


def load_config_file(path: str | Path) -> RunConfig:
    path = Path(path)
    data = read_structured(path, "config file", ConfigError)
    if not isinstance(data, dict) or set(data) != {BLOCK}:
        found = list(data) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"config file {str(path)!r}: expected exactly one top-level key {BLOCK!r}, found {found}")
    block = data[BLOCK] or {}
    if isinstance(block, dict) and "config_file" in block:
        raise ConfigError(f"config file {str(path)!r}: {BLOCK}.config_file is set by lens_compare, not in a file")
    return RunConfig.from_dict({**block, "config_file": str(path)}, BLOCK)
