"""Ways of producing both models' residual states, shard by shard, behind one interface.

An engine is a function ``engine(job, store)``: it runs every shard the store does
not hold yet through both models and leaves in the store each shard's per-state
metrics (and the states themselves when ``job.keep_states``), plus what it learnt
from each model's weights (``store.put(Kind.FACTS, ...)``). The pipeline picks the engine by
the schedule the preflight chose and assembles the result from the store.

- ``resident``: both models loaded at once (``engines.bridge.run_resident``);
- ``sequential``: one model at a time, each loaded once for all shards
  (``engines.bridge.run_sequential``);
- ``stream``: both models layer-major in lockstep from their safetensors checkpoints,
  one block in memory at a time (``engines.stream.run_stream``).
Either model may be split over GPUs or quantized to NF4: that is a load option
(``LoadOptions``), not another engine.
"""

from collections.abc import Callable

from lens_compare.engines.job import Job

__all__ = ["Job", "engine_for"]


def _engines() -> dict[str, Callable]:
    from lens_compare.engines.bridge import run_resident, run_sequential
    from lens_compare.engines.stream import run_stream

    return {"resident": run_resident, "sequential": run_sequential, "stream": run_stream}


def engine_for(schedule: str) -> Callable:
    engines = _engines()
    if schedule not in engines:
        raise KeyError(f"no engine for schedule {schedule!r}; expected one of {sorted(engines)}")
    return engines[schedule]
