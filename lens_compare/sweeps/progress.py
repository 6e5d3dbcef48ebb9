"""The sweep's progress: one bar over its runs, moved on by the shards of the capture at hand,
with an ETA, and one line per finished run.

The bar counts runs (pairs x lengths). While captures run, a watcher thread reads their run
folders every ``poll_seconds`` and moves the bar on by the share of each one's shards that are in,
times the runs it serves, so the ETA follows the shards however they run: in this process or in
Ray actors on other nodes (they write the same folders), one capture at a time or several. A run
that ends (done, failed or refused) puts the bar at its whole count and writes one line above it.

>>> with SweepProgress(total=8, initial=0) as progress:                  # doctest: +SKIP
...     progress.watch(key, "qwen7b", 250, runs=4, pending=lambda: comparison.pending(folder), shards=12)
...     comparison.run(folder)
...     progress.unwatch(key)
...     progress.finished(entry)
"""

import logging
import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass

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


@dataclass
class _Watched:
    pair: str
    tokens: int
    runs: int
    pending: Callable[[], list[int]]
    shards: int
    share: float = 0.0


class SweepProgress:
    """One bar for a sweep of ``total`` runs, ``initial`` of them done before it starts."""

    def __init__(self, total: int, initial: int = 0, *, poll_seconds: float = 1.0, show: bool = True):
        self._bar = progress_bar(outer=True, total=total, initial=initial, desc="sweep", unit="run",
                                 dynamic_ncols=True, disable=not show,
                                 bar_format="{l_bar}{bar}| {n:.1f}/{total} runs [{elapsed}<{remaining}{postfix}]")
        self._done = float(initial)
        self._watched: dict[Hashable, _Watched] = {}
        self._lock = threading.RLock()
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="lens_compare-sweep-progress", daemon=True)
        # Above the bar where it shows, else in the log.
        self._write = self._bar.write if show else lambda line: logger.info("%s", line)

    def __enter__(self) -> "SweepProgress":
        self._quiet = one_bar()
        self._quiet.__enter__()
        self._watcher.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._watcher.join()
        self._bar.close()
        self._quiet.__exit__(*exc)

    @property
    def done(self) -> float:
        """Runs finished, plus the finished share of the captures under way."""
        return self._bar.n

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            self.refresh()

    def refresh(self) -> None:
        """Read the watched captures' run folders and show where the sweep stands."""
        with self._lock:
            watched = list(self._watched.values())
        for capture in watched:
            try:
                left = len(capture.pending())
            except OSError:  # a shard being written as the folder is read: the next poll sees it
                continue
            capture.share = (capture.shards - left) / capture.shards if capture.shards else 0.0
        with self._lock:
            watched = list(self._watched.values())
            moving = sum(capture.runs * capture.share for capture in watched)
            if len(watched) == 1:
                capture = watched[0]
                postfix = (f"{capture.pair} @ {capture.tokens} tok: shard "
                           f"{round(capture.share * capture.shards)}/{capture.shards}")
            else:
                postfix = f"{len(watched)} captures running" if watched else ""
            self._show(self._done + moving, postfix)

    def _show(self, n: float, postfix: str) -> None:
        with self._lock:
            self._bar.n = max(n, self._bar.n)  # never backwards
            self._bar.set_postfix_str(postfix, refresh=False)
            self._bar.refresh()

    def watch(self, key: Hashable, pair: str, tokens: int, *, runs: int, pending: Callable[[], list[int]],
              shards: int) -> None:
        """Until ``unwatch(key)``, move the bar on by ``runs`` x the share of the capture's ``shards``
        that ``pending()`` no longer lists."""
        with self._lock:
            self._watched[key] = _Watched(pair, tokens, runs, pending, shards)
        self.refresh()

    def unwatch(self, key: Hashable) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def finished(self, entry: SweepEntry) -> None:
        """A run has ended: count it whole and write its line."""
        with self._lock:
            self._done += 1
            # The capture's shards may already have moved the bar over the runs it serves.
            moving = sum(capture.runs * capture.share for capture in self._watched.values())
            self._show(self._done + moving, "")
        self._write(run_line(entry))
