"""Where lens_compare keeps what it builds once and reuses: ``$LENS_COMPARE_CACHE``, else
``~/.cache/lens_compare``. Every entry is written to a temporary folder beside its final
name and renamed into place, so a half-built entry is never used.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LENS_COMPARE_CACHE") or Path.home() / ".cache" / "lens_compare").expanduser()


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """``target`` if it exists, else ``build(tmp)`` into a fresh folder renamed to ``target``."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
