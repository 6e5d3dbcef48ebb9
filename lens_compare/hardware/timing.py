"""Wall time and cost of one run, with the assumptions in the constants below.

A run reads both checkpoints from local disk and runs one forward pass per model.
At batch 1 and a few hundred tokens the forward is bounded by either reading every
weight once from GPU memory or the FLOPs (2 x active params x tokens) at MFU; the
load from disk dominates either way. The first download from the hub is not counted.

Loading adds work of its own on the CPU: a GGUF file is dequantized by gguf-py
(``GGUF_DEQUANT_S_PER_GPARAM``), and NF4 weights not yet in lens_compare's cache are
quantized by bitsandbytes' CPU kernels (``CPU_NF4_QUANTIZE_S_PER_GB``), both measured
on this project's 2-core machine. On a GPU bitsandbytes quantizes as it loads at
memory speed, which the disk read already bounds. The NF4 forward costs what the
16-bit one does: dequantizing every weight once per forward took 0.1 s of a 3 s
forward on the CPU (SmolLM2, 4 x 250 tokens: NF4/float32 1.00-1.06).

``stream`` (``stream_seconds``) reads each checkpoint once, block by block, on a
background thread while the previous block computes: per model the larger of the disk read
and the compute, plus the frontier it writes after every block (the newest residual
state of every prompt, so a killed run resumes there) and the set-up. It builds no
TransformerBridge, so there is no bridge boot.

The steering check (``steering_seconds``) comes after the core run: forwards of the base model
steered at a few layers by a few multiples of the difference lens's mean shift, each read through
its final norm and unembedding, and on ``sequential`` the base model loaded once more.
"""

from dataclasses import replace

from lens_compare.hardware.estimate import ModelEstimate
from lens_compare.hardware.machine import Machine
from lens_compare.hardware.run_memory import Workload
from lens_compare.util.choices import DTYPE_BYTES

DISK_GBPS = 2.0  # local NVMe read, GB/s
# Local NVMe sustained write, GB/s: assumed (not measured) at half the read, which
# covers most datacenter NVMe and leaves room for the page cache flushing behind it.
DISK_WRITE_GBPS = 1.0
MFU = 0.4  # fraction of dense 16-bit peak a prefill reaches
CPU_GFLOPS = 100.0  # float32 GEMMs; this project's 2-core machine measured 90-99 in a forward
# Host-side Python work, on any machine (measured on the 2-core machine; faster hosts
# take less): a run loads configs and tokenizers and tokenizes before the first weight
# and assembles the result after the last; per model, TransformerBridge wraps each
# block's modules at boot, and the run fingerprints the weights, looks for untrained
# embedding rows and hands freed memory back (garbage collection).
RUN_SETUP_S = 1.5
MODEL_OVERHEAD_S = 0.3
BRIDGE_BOOT_S_PER_BLOCK = 0.045
GGUF_DEQUANT_S_PER_GPARAM = 150.0  # gguf-py to float32, 2 cores: 18-23 s for SmolLM2's 0.13 B
CPU_NF4_QUANTIZE_S_PER_GB = 15.0  # bitsandbytes CPU, 2 cores, per GB of 16-bit weights: quantize + cache
CPU_NF4_LOAD_GBPS = 0.25  # a cached NF4 checkpoint: bitsandbytes rebuilds its 4-bit parameters
CPU_NF4_DEQUANT_GBPS = 3.15  # float32 weights bitsandbytes rebuilds per forward batch on the CPU
# The logit lens's share of its machine's matmul rate, the divergence arithmetic included: 0.78-1.0
# on the 2-core CPU (SmolLM2's head, 250 tokens x 30 layers, benchmarks/bench_overhead.py).
LENS_EFFICIENCY = 0.8


def _quantized_16bit_bytes(model: ModelEstimate) -> int:
    # absmax: 4 bytes per 64 quantized weights -> the bytes those weights take in 16 bit
    return model.weights["nf4"].constants * 16 * 2


def _read_seconds(model: ModelEstimate) -> float:
    """The whole checkpoint from local disk."""
    return model.disk_gib * 2**30 / (DISK_GBPS * 1e9)


def lens_flops(model: ModelEstimate, workload: Workload, layers: int) -> float:
    """One model's head products of the logit lens at ``layers`` layers: its final norm and
    unembedding once per lensed layer and token, and once more per token for the final
    distributions the other layers are compared with."""
    prompts = workload.prompts or workload.batch
    applications = layers + (1 if layers > 1 else 0)
    return 2.0 * applications * model.arch.vocab_size * model.arch.d_model * workload.tokens * prompts


def lens_seconds(models: tuple[ModelEstimate, ...], machine: Machine, workload: Workload, layers: int) -> float:
    """The logit lens at ``layers`` layers on ``machine``: both models' head products at the machine's
    matmul rate, over ``LENS_EFFICIENCY`` for the divergence arithmetic around them."""
    flops = sum(lens_flops(m, workload, layers) for m in models)
    if machine.kind == "cpu":
        rate = CPU_GFLOPS * 1e9
    elif machine.gpu is None or not machine.gpu.dense_tflops:
        return 0.0
    else:
        rate = machine.gpu.dense_tflops * 1e12 * MFU
    return flops / (rate * LENS_EFFICIENCY)


def forward_seconds(model: ModelEstimate, precision: str | None, machine: Machine, workload: Workload) -> float:
    """Every prompt through ``model`` once, in batches of ``forward_batch`` (the logit lens apart:
    ``lens_seconds``)."""
    prompts = workload.prompts or workload.batch
    batches = -(-prompts // min(workload.forward_batch or prompts, prompts))
    flops = 2 * model.params.active * workload.tokens * prompts
    nf4 = (precision or model.precision) == "nf4"
    if machine.kind == "cpu":
        dequant = batches * _quantized_16bit_bytes(model) * 2 / (CPU_NF4_DEQUANT_GBPS * 1e9) if nf4 else 0.0
        return flops / (CPU_GFLOPS * 1e9) + dequant
    if machine.gpu is None:
        # A detected GPU missing from the catalog: throughput unknown, loading dominates.
        return 0.0
    weight_bytes = model.weights[precision or model.precision].total
    compute = flops / (machine.gpu.dense_tflops * 1e12 * MFU) if machine.gpu.dense_tflops else 0.0
    return max(compute, batches * weight_bytes / (machine.gpu.bandwidth_gbps * 1e9))


def load_seconds(model: ModelEstimate, precision: str | None, machine: Machine) -> float:
    """Loading ``model`` through TransformerBridge once: the host's per-model work, the bridge's boot and
    the weights (read from disk, or a cached NF4 copy rebuilt on the CPU), with the GGUF dequantisation
    and CPU NF4 quantisation a first load does."""
    nf4 = (precision or model.precision) == "nf4"
    total = MODEL_OVERHEAD_S + BRIDGE_BOOT_S_PER_BLOCK * model.arch.n_layers
    if machine.kind == "cpu" and nf4 and model.checkpoint.nf4_cached:
        return total + model.weights["nf4"].total / (CPU_NF4_LOAD_GBPS * 1e9)
    total += _read_seconds(model)
    if model.checkpoint.precision == "gguf" and not model.checkpoint.gguf_cached:
        # Dequantized once into the cache (lens_compare.models.gguf): on the host, whatever the device.
        total += GGUF_DEQUANT_S_PER_GPARAM * model.params.total / 1e9
        total += model.weights["float32"].total / (DISK_WRITE_GBPS * 1e9)
    if machine.kind == "cpu" and nf4:
        total += CPU_NF4_QUANTIZE_S_PER_GB * _quantized_16bit_bytes(model) / 1e9
    return total


def run_seconds(
    models: tuple[ModelEstimate, ...], precision: str | None, machine: Machine, workload: Workload,
) -> float:
    total = RUN_SETUP_S + lens_seconds(models, machine, workload, workload.lens_layers)
    for m in models:
        total += load_seconds(m, precision, machine) + forward_seconds(m, precision, machine, workload)
    return total


def stream_seconds(models: tuple[ModelEstimate, ...], machine: Machine, workload: Workload) -> float:
    """The layer-major streamed run: per model max(checkpoint read, compute) + frontier writes.

    The compute is every prompt through the model in the activation dtype (an FP8
    checkpoint is dequantized as it arrives). The frontier is one residual state of
    every prompt per block: L x prompts x T x d_model x act bytes per model.
    """
    prompts = workload.prompts or workload.batch
    total = RUN_SETUP_S + lens_seconds(models, machine, workload, workload.lens_layers)
    for m in models:
        compute = forward_seconds(m, m.dtype, machine, workload)
        frontier = m.arch.n_layers * prompts * workload.tokens * m.arch.d_model * DTYPE_BYTES[m.dtype]
        total += MODEL_OVERHEAD_S + max(_read_seconds(m), compute) + frontier / (DISK_WRITE_GBPS * 1e9)
    return total


def steering_seconds(models: tuple[ModelEstimate, ...], precision: str | None, machine: Machine,
                     workload: Workload, *, schedule: str, layers: tuple[int, ...], alphas: int,
                     held_out_prompts: int = 0) -> float:
    """The steering check (``lens_compare.engines.steering``) after the core run, on ``schedule``:
    ``models`` are (base, SFT), steered after each block of ``layers`` by ``alphas`` multiples of δ.
    A head is one model's final norm and unembedding over every prompt's tokens (``lens_flops`` at
    one layer); B = len(layers) x alphas steered branches.

    - ``resident`` and ``sequential`` (TransformerBridge): per prompt one SFT forward, one base forward
      and B base forwards, each with its model's head; ``sequential`` loads the base model once more
      (``load_seconds``, its GGUF or NF4 copy cached by then).
    - ``stream``: the core pass kept the base model's ``resid_post`` at each steered layer and both
      models' final states, so it re-reads the base checkpoint's blocks after the first steered layer
      and runs only the branches, Σ_l alphas x (L - l - 1) / L of a base forward: the larger of that
      read and that compute (as ``stream_seconds``), plus the 2 + B heads.
    - ``held_out_prompts`` (the run's tokens each) add, on the bridge engines, the same per prompt; on
      ``stream``, one more pass of both checkpoints over them with the base model's branches riding
      along (per model the larger of its full read and its compute; no set-up, no frontier), and their heads.

    >>> steering_seconds(models, None, cpu, workload, schedule="resident", layers=(0, 7, 14, 22, 29),
    ...                  alphas=3)  # doctest: +SKIP
    231.1
    """
    base, sft = models
    branches = len(layers) * alphas

    def heads(w: Workload) -> float:
        return lens_seconds((sft,), machine, w, 1) + (1 + branches) * lens_seconds((base,), machine, w, 1)

    def forward(m: ModelEstimate, w: Workload) -> float:
        return forward_seconds(m, m.dtype if schedule == "stream" else precision, machine, w)

    held = replace(workload, batch=held_out_prompts, prompts=None) if held_out_prompts else None
    if schedule != "stream":
        total = sum(forward(sft, w) + (1 + branches) * forward(base, w) + heads(w) for w in (workload, held) if w)
        if schedule == "sequential":
            cached = replace(base.checkpoint, gguf_cached=True, nf4_cached=True)
            total += load_seconds(replace(base, checkpoint=cached), precision, machine)
        return total
    n_layers = base.arch.n_layers
    share = sum(alphas * (n_layers - layer - 1) / n_layers for layer in layers)
    after_first = (n_layers - min(layers) - 1) / n_layers if layers else 0.0
    total = max(_read_seconds(base) * after_first, share * forward(base, workload)) + heads(workload)
    if held is not None:
        total += max(_read_seconds(base), (1 + share) * forward(base, held))
        total += max(_read_seconds(sft), forward(sft, held)) + heads(held)
    return total


def run_cost(seconds: float, machine: Machine) -> float | None:
    if machine.gpu is None or machine.gpu.price_per_hour is None:
        return None
    return machine.count * machine.gpu.price_per_hour * seconds / 3600
