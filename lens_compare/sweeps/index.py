"""``OUT/sweep.json``: every run of a sweep, what became of it, and where its JSON is.

Rewritten atomically after each run, so an interrupted sweep keeps what finished and the same
command again redoes only what is missing (an entry ``done`` whose JSON is still there).
"""

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lens_compare.util.outputs import write_json

SCHEMA_VERSION = 1
Status = Literal["done", "failed", "refused"]


@dataclass(frozen=True)
class SweepEntry:
    """One run of a sweep: a pair at a token length."""

    pair: str
    tokens: int
    # done; failed (an error, its one line in ``reason``); refused (by the planner or a check,
    # before any weight loaded).
    status: Status
    reason: str | None = None
    # The run's JSON, relative to the sweep's folder.
    json: str | None = None
    # The length whose capture this run was read from (its own, or a longer one it is a prefix of).
    captured_at: int | None = None
    strategy: str | None = None
    # Wall seconds of the capture this run was read from (shared by the lengths it serves).
    seconds: float | None = None
    # Peak memory of the sweep's process when the run finished: GPU where one ran, else host RSS.
    peak_gib: float | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.pair, self.tokens)


@dataclass
class SweepIndex:
    """The entries of one sweep folder, by (pair, tokens)."""

    folder: Path
    entries: dict[tuple[str, int], SweepEntry] = field(default_factory=dict)
    # Called with each entry once it is recorded (the sweep's progress).
    on_record: Callable[[SweepEntry], None] | None = field(default=None, repr=False, compare=False)

    @property
    def path(self) -> Path:
        return self.folder / "sweep.json"

    @classmethod
    def open(cls, folder: Path) -> "SweepIndex":
        index = cls(Path(folder))
        if index.path.is_file():
            document = json.loads(index.path.read_text())
            for item in document["runs"]:
                entry = SweepEntry(**item)
                index.entries[entry.key] = entry
        return index

    def is_done(self, pair: str, tokens: int) -> bool:
        entry = self.entries.get((pair, tokens))
        return entry is not None and entry.status == "done" and (self.folder / entry.json).is_file()

    def record(self, entry: SweepEntry) -> None:
        self.entries[entry.key] = entry
        write_json(self.path, self.to_dict())
        if self.on_record is not None:
            self.on_record(entry)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION,
                "runs": [dataclasses.asdict(entry) for _, entry in sorted(self.entries.items())]}

    def table(self) -> str:
        """What ran, what failed and why: one line a run."""
        lines = [f"{'pair':<18} {'tokens':>6}  {'status':<8} {'strategy':<10} {'seconds':>8}  detail"]
        for _, entry in sorted(self.entries.items()):
            seconds = "" if entry.seconds is None else f"{entry.seconds:.1f}"
            detail = entry.reason or (entry.json if entry.captured_at in (None, entry.tokens)
                                      else f"{entry.json} (prefix of the {entry.captured_at}-token capture)")
            lines.append(f"{entry.pair:<18} {entry.tokens:>6}  {entry.status:<8} {entry.strategy or '':<10} "
                         f"{seconds:>8}  {detail}")
        return "\n".join(lines)
