"""The numerical noise floor of a run, measured in the run itself (``--noise-floor``).

A base-vs-SFT difference means something only where it exceeds what the arithmetic alone
changes. After the run, the SFT model runs once more in a second precision (float32 when
the run is 16-bit, bfloat16 when it is float32) on the same prompts; the floor is the SFT
model compared with itself under that change, per token, with the residual metrics (its
"base" side is the run's own SFT states, its "sft" side the second precision's). Every
residual layer record then gets ``clears_noise``: the base-vs-SFT mean ``relative_l2``
over the floor's.

The extra forward runs where the run ran when the second precision's weights fit there
beside nothing else (the run's models are released by then), else on the CPU. A streamed
run streams it block by block on its device, as it streamed the run. Each shard's floor is
stored as soon as it is computed, so an interrupted floor resumes too.
"""

import logging
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import replace

import torch

from lens_compare.capture.streamed import stream_states
from lens_compare.engines.job import Job
from lens_compare.engines.loaded import open_model
from lens_compare.engines.store import Kind
from lens_compare.hardware.precision import floor_dtype, model_weight_bytes
from lens_compare.metrics.per_token import state_metrics
from lens_compare.metrics.states import ResidualStates
from lens_compare.models.load_options import LoadOptions
from lens_compare.util.host_memory import release_host_memory
from lens_compare.util.progress import progress_bar
from lens_compare.util.units import GIB

logger = logging.getLogger("lens_compare")
# The floor's weights plus a quarter for its forward pass.
WEIGHT_HEADROOM = 1.25


def floor_bytes(config, dtype: str) -> int:
    """What the floor's SFT model takes in ``dtype``: its weights, and a quarter more for its forward."""
    return int(model_weight_bytes(config, dtype) * WEIGHT_HEADROOM)


def floor_device(job: Job, schedule: str, dtype: str) -> str:
    """The run's device when the SFT model fits there in ``dtype`` (with a quarter spare for the
    forward), else the CPU; a streamed run keeps its device (one block at a time)."""
    device = job.device
    if schedule == "stream" or not device.startswith("cuda"):
        return device
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    need = floor_bytes(job.model_configs["sft"], dtype)
    if need <= free:
        return device
    logger.info("noise floor: the SFT model in %s needs ~%.1f GiB, %s has %.1f GiB free: running it on the CPU",
                dtype, need / GIB, device, free / GIB)
    return "cpu"


def floor_job(job: Job, dtype: str, device: str) -> Job:
    """The run's job as the floor runs it: the SFT model in ``dtype`` on ``device``, residual states only."""
    options = LoadOptions(dtype, device, model_kwargs=dict(job.loads["sft"].model_kwargs))
    return replace(job, loads={**job.loads, "sft": options}, component_layers=(), lens_layers=())


def run_noise_floor(job: Job, schedule: str, store) -> None:
    """The floor of every shard the store does not hold yet (the run's SFT states must be kept)."""
    pending = [shard for shard in job.selected_shards() if not store.has(Kind.NOISE, shard=shard)]
    if not pending:
        return
    side = job.sides[1]
    dtype = floor_dtype(side.dtype)
    device = floor_device(job, schedule, dtype)
    logger.info("noise floor: the SFT model once more in %s on %s, against its %s run", dtype, device, side.dtype)
    with _second_capture(floor_job(job, dtype, device), schedule) as capture, \
            progress_bar(total=len(pending), desc="noise floor", unit="shard", dynamic_ncols=True) as bar:
        for shard in pending:
            second = capture(shard)
            floor = state_metrics(store.get(Kind.STATES, role="sft", shard=shard), second)
            store.put(Kind.NOISE, floor, shard=shard)
            bar.update(1)
    release_host_memory()


@contextmanager
def _second_capture(job: Job, schedule: str) -> Iterator[Callable[[int], ResidualStates]]:
    """A shard's SFT states in the floor's precision: through the bridge engines' loaded model, or
    streamed block by block after a streamed run; the model is freed on exit."""
    side = job.sides[1]
    if schedule != "stream":
        with closing(open_model(job, side)) as model:
            yield lambda shard: model.capture(job, shard, None)
        return

    def streamed(shard: int) -> ResidualStates:
        token_ids, real = job.shard_inputs(shard)
        return stream_states("sft", side.ref, job.model_configs["sft"], job.loads["sft"], token_ids, real,
                             job.states, batch_size=job.batch_size)

    yield streamed
