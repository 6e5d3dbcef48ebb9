"""Writing results to disk: every file appears whole or not at all."""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lens_compare.capture import ResidualStates
from lens_compare.errors import ConfigError
from lens_compare.hooks import HOOK_KINDS, hook_name

EXPORT_FORMATS = ("parquet", "csv")


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it into place.

    An exception or an interrupt (KeyboardInterrupt included) removes the temp
    file, so a failed run never leaves a half-written output behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path, document: dict[str, Any]) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")

    return write_atomically(path, write)


def check_output_dir(directory: Path) -> None:
    """Fail before any model loads if results could not be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"output directory {str(directory)!r} cannot be created: {error}") from None
    if not os.access(directory, os.W_OK):
        raise ConfigError(f"output directory {str(directory)!r} is not writable")


def check_export_formats(formats: tuple[str, ...]) -> None:
    for fmt in formats:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"export format {fmt!r} is not one of {EXPORT_FORMATS}")
    if "parquet" in formats:
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                "parquet export needs pyarrow: `pip install 'lens_compare[parquet]'` or use csv"
            ) from None


def write_frame(path: Path, frame, fmt: str) -> Path:
    def write(tmp: Path) -> None:
        if fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        else:
            frame.to_csv(tmp, index=False)

    return write_atomically(path, write)


def residual_tensors(
    base: ResidualStates, sft: ResidualStates, layers: tuple[int, ...],
    token_ids: torch.Tensor, real_tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Safetensors payload: ``{model}/blocks.{l}.hook_resid_{pre,post}`` ``[prompt, pos, d_model]``.

    Safetensors cannot alias, so the shared states are written under both names;
    the file is for independent re-computation, not for compactness.
    """
    tensors: dict[str, torch.Tensor] = {"token_ids": token_ids, "attention_mask": real_tokens.to(torch.int8)}
    for model, states in (("base", base), ("sft", sft)):
        for kind in HOOK_KINDS:
            for layer in layers:
                tensors[f"{model}/{hook_name(kind, layer)}"] = states.view(kind, layer).contiguous().clone()
    return tensors


def write_residuals(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
