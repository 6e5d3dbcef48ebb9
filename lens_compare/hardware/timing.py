"""Wall time and cost of one run, with the assumptions in the constants below.

A run reads both checkpoints from local disk and runs one forward pass per model.
At batch 1 and a few hundred tokens the forward is bounded by either reading every
weight once from GPU memory or the FLOPs (2 x active params x tokens) at MFU; the
load from disk dominates either way. The first download from the hub is not counted.
"""

from lens_compare.hardware.estimate import ModelEstimate
from lens_compare.hardware.machine import Machine

DISK_GBPS = 2.0  # local NVMe read, GB/s
PCIE_GBPS = 25.0  # host -> GPU, PCIe 4.0 x16 effective, GB/s
MFU = 0.4  # fraction of dense 16-bit peak a prefill reaches
CPU_GFLOPS = 100.0  # a many-core host in float32 GEMMs
# TransformerBridge wraps every component call in accelerate's align_module_device, and
# accelerate's own offload hook moves the weight again: each offloaded weight crosses
# PCIe twice per forward (measured on a tiny Llama: 2,208,256 bytes moved against
# 1,104,128 for plain HF).
BRIDGE_OFFLOAD_MOVES = 2


def forward_seconds(model: ModelEstimate, precision: str | None, machine: Machine, tokens: int) -> float:
    flops = 2 * model.params.active * tokens
    if machine.kind == "cpu":
        return flops / (CPU_GFLOPS * 1e9)
    if machine.gpu is None:
        # A detected GPU missing from the catalog: throughput unknown, loading dominates.
        return 0.0
    weight_bytes = model.weights[precision or model.precision].total
    compute = flops / (machine.gpu.dense_tflops * 1e12 * MFU) if machine.gpu.dense_tflops else 0.0
    return max(compute, weight_bytes / (machine.gpu.bandwidth_gbps * 1e9))


def run_seconds(
    models: tuple[ModelEstimate, ...], precision: str | None, machine: Machine, tokens: int,
    *, stream_weights: bool = False,
) -> float:
    total = 0.0
    for m in models:
        total += m.disk_gib * 2**30 / (DISK_GBPS * 1e9)
        total += forward_seconds(m, precision, machine, tokens)
        if stream_weights:
            total += BRIDGE_OFFLOAD_MOVES * m.weights[precision or m.precision].total / (PCIE_GBPS * 1e9)
    return total


def run_cost(seconds: float, machine: Machine) -> float | None:
    if machine.gpu is None or machine.gpu.price_per_hour is None:
        return None
    return machine.count * machine.gpu.price_per_hour * seconds / 3600
