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

import torch

from lens_compare.capture import ResidualStates, capture_states
from lens_compare.engines import Job
from lens_compare.hardware.precision import floor_dtype
from lens_compare.hardware.units import DTYPE_BYTES, GIB
from lens_compare.host_memory import release_host_memory
from lens_compare.load_options import LoadOptions
from lens_compare.loading import boot_bridge, load_hf_model, weights_ref
from lens_compare.per_token import state_metrics
from lens_compare.progress import progress_bar
from lens_compare.store import Kind

logger = logging.getLogger("lens_compare")
# The floor's weights plus a quarter for its forward pass.
WEIGHT_HEADROOM = 1.25




def floor_device(job: Job, schedule: str, dtype: str) -> str:
    """The run's device when the SFT model fits there in ``dtype`` (with a quarter spare for the
    forward), else the CPU; a streamed run keeps its device (one block at a time)."""
    device = job.run.device
    if schedule == "stream" or not device.startswith("cuda"):
        return device
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    need = _weight_bytes(job, dtype) * WEIGHT_HEADROOM
    if need <= free:
        return device
    logger.info("noise floor: the SFT model in %s needs ~%.1f GiB, %s has %.1f GiB free: running it on the CPU",
                dtype, need / GIB, device, free / GIB)
    return "cpu"


def _weight_bytes(job: Job, dtype: str) -> int:
    from lens_compare.hardware.architecture import architecture_from_config
    from lens_compare.hardware.params import count_params

    config = job.run.model_configs["sft"]
    return count_params(architecture_from_config(config)).total * DTYPE_BYTES[dtype]


def run_noise_floor(job: Job, schedule: str, store) -> None:
    """The floor of every shard the store does not hold yet (the run's SFT states must be kept)."""
    pending = [shard for shard in range(job.layout.count) if not store.has(Kind.NOISE, shard=shard)]
    if not pending:
        return
    side = job.run.sft
    dtype = floor_dtype(side.dtype)
    device = floor_device(job, schedule, dtype)
    logger.info("noise floor: the SFT model once more in %s on %s, against its %s run", dtype, device, side.dtype)
    capture = _streamed(job, dtype, device) if schedule == "stream" else _bridged(job, dtype, device)
    with progress_bar(total=len(pending), desc="noise floor", unit="shard", dynamic_ncols=True) as bar:
        for shard in pending:
            second = capture(shard)
            floor = state_metrics(store.get(Kind.STATES, role="sft", shard=shard), second)
            store.put(Kind.NOISE, floor, shard=shard)
            bar.update(1)
    release_host_memory()


def _bridged(job: Job, dtype: str, device: str):
    side = job.run.sft
    options = LoadOptions(dtype, device, model_kwargs=dict(job.loads["sft"].model_kwargs))
    model = load_hf_model(weights_ref(side.ref), job.run.model_configs["sft"], options)
    bridge = boot_bridge(model, side.ref, job.run.tokenizers["sft"], options)

    def capture(shard: int) -> ResidualStates:
        token_ids, real = job.shard_inputs(shard)
        return capture_states(bridge, token_ids, real, job.states, batch_size=job.run.config.batch_size,
                              label="sft (noise floor)")

    return capture


def _streamed(job: Job, dtype: str, device: str):
    from lens_compare.streaming import stream_states

    side = job.run.sft

    def capture(shard: int) -> ResidualStates:
        token_ids, real = job.shard_inputs(shard)
        return stream_states("sft", side.ref, job.run.model_configs["sft"], LoadOptions(dtype, device), token_ids,
                             real, job.states, batch_size=job.run.config.batch_size)

    return capture


def floor_provenance(model: str | None, dtypes: dict[str, str], n_layers: int, run: dict | None = None) -> dict:
    """The provenance of a noise floor as a result of its own: the SFT model ``model`` in its run
    precision (``dtypes["base"]``, the floor's "base" side) against itself in the second one
    (``dtypes["sft"]``); ``run``, the run's own provenance, lends the strategy and device."""
    run = run or {}
    side = {"reference": model, "kind": "noise floor"}
    return {
        "kind": "noise_floor",
        "pair": f"sft {dtypes['base']} vs {dtypes['sft']}",
        "model": model,
        "base_model": {**side, "dtype": dtypes["base"]},
        "sft_model": {**side, "dtype": dtypes["sft"]},
        "dtype": dict(dtypes),
        "n_layers": n_layers,
        "strategy": run.get("strategy"),
        "device": run.get("device"),
    }


def noise_floor_result(job: Job, store, width: int, run_provenance: dict, token_strings: tuple):
    """The noise floor as a result of its own: the SFT model (its run precision as "base") against
    itself in the second precision (as "sft"), with the residual metrics only."""
    from lens_compare.bootstrap import Bootstrap
    from lens_compare.per_token import hook_metrics
    from lens_compare.result import ComparisonResult
    from lens_compare.store import stack_metrics

    run = job.run
    per_state = stack_metrics([store.get(Kind.NOISE, shard=shard) for shard in range(job.layout.count)], width)
    second = floor_dtype(run.sft.dtype)
    return ComparisonResult(
        provenance=floor_provenance(run.sft.ref.spec, {"base": run.sft.dtype, "sft": second},
                                    run.model_configs["sft"].num_hidden_layers, run_provenance),
        layers=run.layers, tokens=run.tokenized,
        token_strings=token_strings,
        untrained_base_tokens={}, real_tokens=job.real, metrics=hook_metrics(per_state, job.states, run.layers),
        include_first_token=run.config.include_first_token, bootstrap=Bootstrap(run.config.bootstrap, run.config.seed),
    )
