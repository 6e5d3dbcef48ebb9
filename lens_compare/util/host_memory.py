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


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory (``VmHWM``) afresh from what it holds now, so that
    ``peak_rss_bytes`` measures what comes next (Linux >= 4.0: ``clear_refs`` 5). False where the
    kernel does not allow it: the peak is then the process's lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """This process's peak resident memory since it started or since ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
