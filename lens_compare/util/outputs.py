"""Writing results to disk: every file appears whole or not at all."""

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lens_compare.errors import ConfigError

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
        # Data on disk before the rename, so a crash never leaves a whole-looking but
        # truncated file under the final name.
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_json(path: Path, document: dict[str, Any]) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")

    return write_atomically(path, write)


def check_output_dir(directory: Path) -> None:
    """Fail before any model loads if results could not be written, without leaving anything
    behind: a run that fails validation leaves no empty directory.

    The nearest existing ancestor must take a new file: a probe file is created there and
    removed (``os.access`` is not enough: root passes it on read-only and virtual file systems
    such as ``/proc`` and ``/sys``, where every write then fails).
    """
    existing = Path(directory).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output directory {str(directory)!r} cannot be created: {str(existing)!r} is a file")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".lens_compare-probe-", suffix=".tmp")
    except OSError as error:
        where = "is not writable" if existing == Path(directory).absolute() else \
            f"cannot be created: {str(existing)!r} is not writable"
        # /proc answers ENOENT to a new file: "not writable" says it better than that errno.
        reason = f" ({error.strerror})" if error.strerror and error.errno != errno.ENOENT else ""
        raise ConfigError(f"output directory {str(directory)!r} {where}{reason}; pass another --out") from None
    os.close(handle)
    os.unlink(probe)


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
