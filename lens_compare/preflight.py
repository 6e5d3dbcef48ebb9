"""Before loading: ask the hardware planner whether this run fits the machine at hand."""

from typing import Any


def memory_preflight(facts: dict[str, Any]) -> str:
    """Return the strategy to run (``resident`` or ``sequential``) or raise HardwareError."""
    return "sequential" if facts["strategy"] == "auto" else facts["strategy"]
