"""Where lens_compare keeps what it builds once and reuses: ``$LENS_COMPARE_CACHE``, else
``~/.cache/lens_compare``. Every entry is written to a temporary folder beside its final
name and renamed into place, so a half-built entry is never used.
"""

import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LENS_COMPARE_CACHE") or Path.home() / ".cache" / "lens_compare").expanduser()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` if it exists, else ``build(tmp)`` into a fresh folder renamed to ``target``.

    Processes that need the same entry at once (two test workers, two runs) take turns on a
    lock file beside it: one builds, the others wait and then find it built."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        if target.is_dir():  # another process built it while this one waited
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
        try:
            build(tmp)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    """An exclusive lock on building ``target`` for the duration of the block. The lock files live
    in the cache's ``.locks/`` (never beside the entries, which stay exactly what was built)."""
    locks = cache_root() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(str(target.absolute()).encode()).hexdigest()[:24]
    with open(locks / f"{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
