"""The notebook entry point: ``lens_compare.compare``; its keywords are ``RunConfig``'s options."""

import difflib
import inspect
import typing
from collections.abc import Sequence
from typing import Any

from lens_compare.config import RunConfig, keyword_options
from lens_compare.errors import ConfigError
from lens_compare.pipeline.comparison import run_comparison
from lens_compare.pipeline.preflight import memory_preflight
from lens_compare.results.result import ComparisonResult
from lens_compare.util.progress import quiet_library_bars


def compare(
    pair: str | None = None,
    prompts: Sequence[str] | str = (),
    *,
    keep_residuals: bool = False,
    check_memory: bool = True,
    **options: Any,
) -> ComparisonResult:
    """Compare a base model and its SFT sibling on ``prompts``; nothing is written to disk.

    >>> result = lens_compare.compare("smollm2-sanity", prompts=["The capital of France is"])
    >>> result.summary().query("metric == 'cosine'")      # doctest: +SKIP
    >>> result.to_dataframe()                               # doctest: +SKIP

    Every per-layer mean gets a 95% percentile bootstrap interval (``ci_low``, ``ci_high``)
    from ``bootstrap`` resamples of the prompts (of the tokens, with one prompt), drawn with
    ``seed``. ``result.analysis_records("components")``, ``summary(hook="mlp_out")``,
    ``result.top_tokens()``, ``result.difference_lens()``, ``result.difference_positions()``,
    ``result.cka`` and ``result.noise_floor`` hold the analyses.

    ``keep_residuals`` keeps both models' captured states in ``result.residuals``.
    ``check_memory`` asks the hardware planner first and refuses a run whose weights cannot fit
    on this machine (instead of failing halfway through loading). Everything stays in memory:
    for hours-long prompt sets use the CLI, whose run folder resumes after an interruption.

    The options, each also a ``residual_compare:`` key and a ``python -m lens_compare.run`` flag:
    """
    quiet_library_bars()
    config = RunConfig().given(config_values(pair, prompts, options), path="compare()")
    return run_comparison(config, preflight=memory_preflight if check_memory else None,
                          keep_residuals=keep_residuals)


def config_values(pair: str | None, prompts: Sequence[str] | str, options: dict[str, Any]) -> dict[str, Any]:
    """``compare()``'s arguments as ``RunConfig`` values; an unknown keyword is refused by name."""
    fields = keyword_options()
    unknown = [name for name in options if name not in fields or name in ("pair", "prompts")]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        raise ConfigError(f"compare() got an unknown keyword {unknown[0]!r}"
                          + (f" (did you mean {close[0]!r}?)" if close else "")
                          + f"; its options: {', '.join(fields)}")
    values = {fields[name].name: list(value) if isinstance(value, (tuple, range)) else value
              for name, value in options.items()}
    if pair is not None:
        values["pair"] = pair
    if prompts:
        values["prompts"] = [prompts] if isinstance(prompts, str) else list(prompts)
    return values


def _signature() -> inspect.Signature:
    """``compare()``'s signature with every option as a keyword, for ``help()`` and completion."""
    hints = typing.get_type_hints(RunConfig)
    shown = inspect.signature(compare)
    keep = [shown.parameters[name] for name in ("pair", "prompts", "keep_residuals", "check_memory")]
    options = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default, annotation=hints[field.name])
        for name, field in keyword_options().items() if name not in ("pair", "prompts")
    ]
    return shown.replace(parameters=[*keep, *options])


def _options_doc() -> str:
    lines = []
    for name, field in keyword_options().items():
        spec = field.metadata["option"]
        flag = spec.flag or "--" + field.name.replace("_", "-")
        lines.append(f"    - ``{name}`` (``{flag}``, default ``{field.default!r}``): {spec.help}")
    return "\n".join(lines)


compare.__signature__ = _signature()
compare.__doc__ = f"{compare.__doc__.rstrip()}\n\n{_options_doc()}\n"
