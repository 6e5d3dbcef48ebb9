"""Ways of producing both models' residual states, shard by shard, behind one interface.

An engine is a function ``engine(job, store)``: it runs every shard the store does
not hold yet through both models and leaves in the store each shard's per-state
metrics (and the states themselves when ``job.keep_states``), plus what it learnt
from each model's weights (``store.put_facts``). The pipeline picks the engine by
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
from dataclasses import dataclass
from typing import Any

from jaxtyping import Bool, Int
from torch import Tensor

from lens_compare.load_options import LoadOptions
from lens_compare.shards import ShardLayout


@dataclass(frozen=True)
class Job:
    """One comparison's work, as the engines see it."""

    run: Any  # lens_compare.prepare.PreparedRun
    loads: dict[str, LoadOptions]
    layout: ShardLayout
    states: tuple[int, ...]
    keep_states: bool
    token_ids: Int[Tensor, "prompt pos"]
    real: Bool[Tensor, "prompt pos"]
    # Blocks whose attention and MLP outputs are compared (the components analysis); () for none.
    component_layers: tuple[int, ...] = ()
    # Compute the logit lens (``states`` then include the last one, ``n_layers``).
    logit_lens: bool = False
    # Measure the noise floor after the run (``lens_compare.noise_floor``; needs keep_states).
    noise_floor: bool = False

    def shard_inputs(self, shard: int) -> tuple[Int[Tensor, "prompt pos"], Bool[Tensor, "prompt pos"]]:
        """A shard's ids and mask, trimmed to the shard's longest prompt."""
        start, stop = self.layout.bounds[shard]
        real = self.real[start:stop]
        width = int(real.sum(dim=1).max())
        return self.token_ids[start:stop, :width], real[:, :width]

    def shard_prompts(self, shard: int) -> int:
        start, stop = self.layout.bounds[shard]
        return stop - start


def _engines() -> dict[str, Callable]:
    from lens_compare.engines.bridge import run_resident, run_sequential
    from lens_compare.engines.stream import run_stream

    return {"resident": run_resident, "sequential": run_sequential, "stream": run_stream}


def engine_for(schedule: str) -> Callable:
    engines = _engines()
    if schedule not in engines:
        raise KeyError(f"no engine for schedule {schedule!r}; expected one of {sorted(engines)}")
    return engines[schedule]
