"""The sweep's progress: one bar over its runs, moved on by the shards of the capture at hand,
with an ETA, and one line per finished run.

The bar counts runs (pairs x lengths). While a capture runs, a watcher thread reads its run
folder every ``poll_seconds`` and moves the bar on by the share of its shards that are in, times
the runs it serves, so the ETA follows the shards however they run: in this process or in Ray
actors on other nodes (they write the same folder). A run that ends (done, failed or refused)
puts the bar at its whole count and writes one line above it.

>>> with SweepProgress(total=8, initial=0) as progress:                  # doctest: +SKIP
...     with progress.capture("qwen7b", 250, runs=4, pending=lambda: comparison.pending(folder), shards=12):
...         run_shards(comparison, folder)
...     progress.finished(entry)
"""

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from lens_compare.sweeps.index import SweepEntry
from lens_compare.util.progress import one_bar, progress_bar

logger = logging.getLogger("lens_compare")


def run_line(entry: SweepEntry) -> str:
    """One line for a finished run."""
    if entry.status != "done":
        return f"{entry.pair} at {entry.tokens} tokens: {entry.status}: {entry.reason}"
    source = "" if entry.captured_at in (None, entry.tokens) else f", read off the {entry.captured_at}-token capture"
    seconds = "" if entry.seconds is None else f" in {entry.seconds:.1f} s"
    peak = "" if entry.peak_gib is None else f", peak {entry.peak_gib:.2f} GiB"
    return f"{entry.pair} at {entry.tokens} tokens: done{seconds} ({entry.strategy}{source}{peak}) -> {entry.json}"


class SweepProgress:
    """One bar for a sweep of ``total`` runs, ``initial`` of them done before it starts."""

    def __init__(self, total: int, initial: int = 0, *, poll_seconds: float = 1.0, show: bool = True):
        self._bar = progress_bar(outer=True, total=total, initial=initial, desc="sweep", unit="run",
                                 dynamic_ncols=True, disable=not show,
                                 bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}{postfix}]")
        self._done = float(initial)
        self._lock = threading.Lock()
        self._poll = poll_seconds
        # Above the bar where it shows, else in the log.
        self._write = self._bar.write if show else lambda line: logger.info("%s", line)

    def __enter__(self) -> "SweepProgress":
        self._quiet = one_bar()
        self._quiet.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
        self._quiet.__exit__(*exc)

    @property
    def done(self) -> float:
        """Runs finished, plus the finished share of the capture at hand."""
        return self._bar.n

    def _show(self, n: float, postfix: str | None = None) -> None:
        with self._lock:
            self._bar.n = n
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()

    @contextmanager
    def capture(self, pair: str, tokens: int, *, runs: int, pending: Callable[[], list[int]],
                shards: int) -> Iterator[None]:
        """While the body runs, move the bar on by ``runs`` x the share of the capture's ``shards``
        that ``pending()`` no longer lists."""
        stop = threading.Event()

        def show() -> None:
            try:
                left = len(pending())
            except OSError:  # a shard being written as the folder is read: the next poll sees it
                return
            share = (shards - left) / shards if shards else 0.0
            self._show(self._done + runs * share, f"{pair} @ {tokens} tok: shard {shards - left}/{shards}")

        def watch() -> None:
            while not stop.wait(self._poll):
                show()

        show()
        watcher = threading.Thread(target=watch, name="lens_compare-sweep-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()

    def finished(self, entry: SweepEntry) -> None:
        """A run has ended: count it whole and write its line."""
        self._done += 1
        # Never backwards: the capture's shards have already moved the bar over the runs it serves.
        self._show(max(self._done, self._bar.n), "")
        self._write(run_line(entry))
