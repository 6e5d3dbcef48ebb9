"""The hardware planner: what a base/SFT pair needs, from its architecture, and the
strategy that fits the machine at hand; plus the seed's ``local_run`` guard.

>>> from lens_compare.hardware import plan_pair
>>> plan_pair("llama8b", tokens=100, gpu="A100 40GB").strategy
'resident'
"""

from lens_compare.hardware.gpus import GpuType, gpu_catalog, resolve_gpu
from lens_compare.hardware.local_run import (
    AllowedPair,
    GpuFacts,
    LocalRunApproval,
    LocalRunConfig,
    check_local_run,
    query_cuda_device,
)
from lens_compare.hardware.machine import Machine, catalog_machine, detect_machine
from lens_compare.hardware.planner import Plan, plan_for_machine, plan_models, plan_pair
from lens_compare.hardware.precision import PRECISIONS, weight_bytes
from lens_compare.hardware.run_memory import Workload
from lens_compare.hardware.sources import ModelSource, resolve_source
from lens_compare.models.architecture import Architecture, architecture_from_config
from lens_compare.models.params import ParamCount, count_params
from lens_compare.util.choices import STRATEGIES

__all__ = [
    "PRECISIONS",
    "STRATEGIES",
    "AllowedPair",
    "Architecture",
    "GpuFacts",
    "GpuType",
    "LocalRunApproval",
    "LocalRunConfig",
    "Machine",
    "ModelSource",
    "ParamCount",
    "Plan",
    "Workload",
    "architecture_from_config",
    "catalog_machine",
    "check_local_run",
    "count_params",
    "detect_machine",
    "gpu_catalog",
    "plan_for_machine",
    "plan_models",
    "plan_pair",
    "query_cuda_device",
    "resolve_gpu",
    "resolve_source",
    "weight_bytes",
]
