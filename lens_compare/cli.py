"""What every ``python -m lens_compare.*`` entry point does on exit.

>>> exit_with(lambda: 0)   # doctest: +SKIP
"""

import os
import sys
from collections.abc import Callable


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
