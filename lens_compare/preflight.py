"""Before any weights load: the local_run guard, and the planner's verdict for this machine.

``memory_preflight`` gets the facts the pipeline has gathered without loading weights
(the models' configs, token counts, dtypes, device, captured layers) and asks the
hardware planner whether the run fits the machine it is on. It returns the strategy
to run, or raises ``HardwareError`` with the planner's explanation, so a run that
cannot fit stops here instead of running out of memory halfway through loading.
"""

import logging
from pathlib import Path
from typing import Any

from lens_compare.errors import HardwareError, UnsupportedArchitectureError
from lens_compare.hardware import Machine, Workload, detect_machine, plan_models
from lens_compare.hardware.local_run import (
    LocalRunApproval,
    LocalRunConfig,
    check_local_run,
    query_cuda_device,
)
from lens_compare.hardware.machine import host_ram_gib
from lens_compare.hardware.sources import ModelSource, checkpoint_of
from lens_compare.hooks import states_for_layers

logger = logging.getLogger("lens_compare")

# The strategies the core pipeline runs itself; nf4 and cpu offload belong to the
# run-strategies work and are refused here rather than silently substituted.
RUNNABLE = ("resident", "sequential")


def machine_for(device: str) -> Machine:
    """The machine the models will actually be placed on."""
    if device == "cpu":
        _, available = host_ram_gib()
        return Machine("cpu", 1, available, available)
    # lens_compare places both models on the one device it was given.
    index = int(device.partition(":")[2] or 0)
    return detect_machine(index).with_count(1)


def _source(side, config) -> ModelSource:
    gguf_bytes = (Path(side.ref.location) / side.ref.gguf_file).stat().st_size if side.ref.gguf_file else 0
    return ModelSource(side.ref.spec, config, checkpoint_of(config, gguf_bytes))


def memory_preflight(facts: dict[str, Any]) -> str:
    """Return ``resident`` or ``sequential`` for this run, or raise HardwareError."""
    base, sft = facts["base"], facts["sft"]
    workload = Workload(
        tokens=facts["max_tokens"],
        batch=facts["n_prompts"],
        forward_batch=facts["batch_size"],
        base_dtype=base.dtype,
        sft_dtype=sft.dtype,
        states=len(states_for_layers(facts["layers"])),
    )
    requested = None if facts["strategy"] == "auto" else facts["strategy"]
    try:
        plan = plan_models(
            _source(base, facts["configs"]["base"]),
            _source(sft, facts["configs"]["sft"]),
            workload,
            machine_for(facts["device"]),
            strategy=requested,
            pair=facts.get("pair"),
            with_cheapest=False,
        )
    except UnsupportedArchitectureError as error:
        # The pipeline runs any architecture TransformerLens bridges; the planner only
        # models the seed's families. Say so loudly rather than refuse a runnable pair.
        strategy = requested or "sequential"
        logger.warning("no memory check for this run: %s Running %s without a plan.", error, strategy)
        return strategy
    logger.info("hardware plan:\n%s", plan.explain())
    if plan.strategy is None:
        raise HardwareError(f"refusing to load: nothing fits on {plan.machine.label}. {plan.explain()}")
    if plan.strategy not in RUNNABLE:
        raise HardwareError(
            f"refusing to load: on {plan.machine.label} this run fits only with the "
            f"{plan.strategy!r} strategy, which lens_compare.run does not run yet. {plan.explain()}"
        )
    return plan.strategy


def local_run_approval(block: dict[str, Any] | None, base: str, sft: str) -> LocalRunApproval | None:
    """The seed's guard: None when disabled; otherwise approve on this GPU or raise HardwareError."""
    if not block:
        return None
    config = LocalRunConfig.from_dict(block)
    if not config.enabled:
        return None
    approval = check_local_run(config, base, sft, query_cuda_device(config.cuda_device_index))
    logger.info(approval.log_line)
    return approval
