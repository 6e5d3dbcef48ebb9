"""Handing freed host memory back to the OS.

glibc keeps freed heap memory for reuse, and its dynamic mmap threshold soon serves
multi-MiB tensors from the heap too, so a freed model, a finished forward or a streamed
block would keep counting in the process's memory (and fragment it) without a trim.
"""

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def trim_heap() -> None:
    """Return every arena's free pages to the OS (a no-op where libc has no malloc_trim)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_host_memory() -> None:
    """Collect garbage, then trim the heap."""
    gc.collect()
    trim_heap()
