"""What every ``python -m lens_compare.*`` command shares: one parser convention, one error
prefix, one set of exit codes, and the run options' flags generated from ``RunConfig``.

Exit codes: 0 done; 1 refused (a bad flag or value, a run the hardware cannot hold, an input
that does not load), argparse's own errors included; 130 interrupted; 141 stdout closed early.
``plan`` adds 3: nothing fits the machine (the plan says why).

>>> parser = Parser(prog="python -m lens_compare.run")
>>> add_run_options(parser, ["tokens"])
>>> given_run_options(parser.parse_args(["--tokens", "50"]))
{'tokens': 50}
"""

import argparse
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

from lens_compare.config import RunConfig, run_options
from lens_compare.errors import ConfigError, LensCompareError

PREFIX = "lens_compare: error:"
REFUSED = 1
INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are ``ConfigError``s: one prefix and exit code 1 for every
    refused input, whether argparse or lens_compare refuses it."""

    def error(self, message: str):
        raise ConfigError(f"{message} (see {self.prog} --help)")


def _comma_list(item: type, example: str) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [item(part) for part in text.split(",")]
        except ValueError:
            kind = "integers" if item is int else "numbers"
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {kind} like {example}") from None

    return parse


def _argparse_keywords(hint: Any, example: str | None) -> dict[str, Any]:
    """``add_argument`` keywords for a field's type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if hint is int:
        return {"type": int}
    if origin is Literal:
        return {"choices": typing.get_args(hint)}
    if origin is tuple and typing.get_args(hint)[0] is int:
        return {"type": _comma_list(int, example or "0,5,10")}
    if origin is tuple and typing.get_args(hint)[0] is float:
        return {"type": _comma_list(float, example or "0.5,1,2")}
    return {}


def add_run_options(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """Add the flags of ``RunConfig``'s options (all that have one, or those ``names``)."""
    wanted = set(names) if names is not None else None
    hints = typing.get_type_hints(RunConfig)
    for field, spec in run_options():
        if spec.flag is None or (wanted is not None and field.name not in wanted):
            continue
        help_text = spec.help.replace("%", "%%")
        hint = hints[field.name]
        if typing.get_origin(hint) is tuple and typing.get_origin(typing.get_args(hint)[0]) is Literal:
            for choice in typing.get_args(typing.get_args(hint)[0]):  # export: one flag per format
                parser.add_argument(f"--{choice}", dest=field.name, action="append_const", const=choice,
                                    help=f"{help_text}: {choice}")
            continue
        keywords = {**_argparse_keywords(hint, spec.metavar), **spec.cli}
        flag = spec.flag or f"--{field.name.replace('_', '-')}"
        if field.default not in (None, (), False) and "default" not in help_text:
            help_text += f" (default: {field.default})"
        metavar = None if "choices" in keywords or keywords.get("action") is argparse.BooleanOptionalAction else \
            spec.metavar or flag.lstrip("-").upper().replace("-", "_")
        parser.add_argument(flag, dest=field.name, default=None, metavar=metavar, help=help_text, **keywords)
        if spec.off_flag:
            parser.add_argument(spec.off_flag, dest=field.name, action="store_const", const=spec.off_value,
                                help=f"same as {spec.flag or '--' + field.name.replace('_', '-')} "
                                     f"{spec.off_value}")


def given_run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (flags left out are not in it)."""
    return {field.name: getattr(args, field.name) for field, spec in run_options()
            if spec.flag is not None and getattr(args, field.name, None) is not None}


def run_command(prog: str, body: Callable[[], int], cleanup_hint: Callable[[], str] | None = None) -> int:
    """Run a command's ``body``: a refusal prints one line with the common prefix and returns 1,
    an interrupt one line (with ``cleanup_hint()``: what was kept) and 130."""
    try:
        return body()
    except LensCompareError as error:
        print(f"{PREFIX} {' '.join(str(error).split())}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:
        hint = cleanup_hint() if cleanup_hint is not None else ""
        print(f"lens_compare: interrupted{hint}", file=sys.stderr)
        return INTERRUPTED


def parse_or_exit(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code for ``--help`` (0) or a refused command line (1, printed)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version
        return int(exit_.code or 0)
    except ConfigError as error:
        print(f"{PREFIX} {' '.join(str(error).split())}", file=sys.stderr)
        return REFUSED


def setup_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # huggingface_hub prints through its own handler and propagates to ours: once is enough.
    logging.getLogger("huggingface_hub").propagate = False


def exit_with(main: Callable[[], int]) -> None:
    """``sys.exit(main())``, quietly when the reader of stdout has gone (``... | head``).

    Python would otherwise print a ``BrokenPipeError`` traceback, once for the write and
    again when it flushes stdout at exit; stdout is pointed at /dev/null for that flush.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 141  # 128 + SIGPIPE, what a shell reports for a reader that went away
    sys.exit(code)
