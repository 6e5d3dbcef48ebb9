"""The machine a plan is for: N GPUs of one type plus host RAM, or a CPU-only host.

``detect_machine`` reads the machine it runs on (CUDA devices through torch, else
``/proc/meminfo``); ``catalog_machine`` describes a rented one from ``gpus.json``.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lens_compare.errors import ConfigError
from lens_compare.hardware.gpus import GpuType, match_device_name, resolve_gpu
from lens_compare.util.units import GIB

# One machine holds at most this many GPUs (an 8-GPU node); more is "beyond one machine".
MAX_GPUS_PER_MACHINE = 8

# A rented GPU node's host RAM is not in gpus.json; cloud nodes typically carry about
# twice their GPU memory (8x H100 nodes: 1-2 TiB). Overridden by --host-ram-gib.
HOST_RAM_PER_GPU_GIB = 2.0


@dataclass(frozen=True)
class Machine:
    kind: Literal["cuda", "cpu"]
    count: int
    # Capacity of each device in GiB (GPU memory, or the RAM available on a CPU host).
    device_gib: float
    host_ram_gib: float
    gpu: GpuType | None = None
    device_name: str = "cpu"
    detected: bool = False

    @property
    def label(self) -> str:
        if self.kind == "cpu":
            return f"CPU ({self.device_gib:.1f} GiB RAM available)"
        return f"{self.count}x {self.device_name} ({self.device_gib:.2f} GiB each)"

    def with_count(self, count: int) -> "Machine":
        """The same GPU type in another count (host RAM scales with it unless detected)."""
        host = self.host_ram_gib if self.detected else count * self.device_gib * HOST_RAM_PER_GPU_GIB
        return Machine(self.kind, count, self.device_gib, host, self.gpu, self.device_name, self.detected)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "type": self.gpu.name if self.gpu else self.device_name,
            "device_name": self.device_name,
            "count": self.count,
            "gib_per_device": round(self.device_gib, 3),
            "host_ram_gib": round(self.host_ram_gib, 3),
            "detected": self.detected,
        }


def check_count(count: Any) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(
            f"GPU count {count!r} is impossible; expected a whole number >= 1 (e.g. --count 2)"
        )
    return count


def catalog_machine(gpu_name: str, count: int = 1, host_ram_gib: float | None = None) -> Machine:
    gpu = resolve_gpu(gpu_name)
    count = check_count(count)
    if host_ram_gib is not None and host_ram_gib <= 0:
        raise ConfigError(f"host RAM {host_ram_gib!r} GiB is impossible; expected a positive number")
    host = host_ram_gib if host_ram_gib is not None else count * gpu.usable_gib * HOST_RAM_PER_GPU_GIB
    return Machine("cuda", count, gpu.usable_gib, host, gpu, gpu.name)


def _meminfo_gib(field: str, meminfo: str) -> float:
    for line in meminfo.splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            return int(rest.split()[0]) * 1024 / GIB
    raise ConfigError(f"/proc/meminfo has no {field} line; cannot size host RAM")


def host_ram_gib(meminfo_path: str = "/proc/meminfo") -> tuple[float, float]:
    """(total, available) host RAM in GiB."""
    text = Path(meminfo_path).read_text()
    return _meminfo_gib("MemTotal", text), _meminfo_gib("MemAvailable", text)


def detect_machine(device_index: int = 0) -> Machine:
    """CUDA devices via torch (name, total memory, count), else the CPU's available RAM.

    The GPU type and memory are those of ``device_index`` (machines mixing GPU types
    are planned as if every GPU were that one).
    """
    import torch

    _, available = host_ram_gib()
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        props = torch.cuda.get_device_properties(device_index)
        total = props.total_memory / GIB
        return Machine(
            kind="cuda",
            count=torch.cuda.device_count(),
            device_gib=total,
            host_ram_gib=available,
            gpu=match_device_name(props.name, total),
            device_name=props.name,
            detected=True,
        )
    return Machine("cpu", 1, available, available, None, "cpu", detected=True)


def detect_gpus(indices: tuple[int, ...], context_gib: float) -> Machine:
    """The CUDA devices ``indices`` as one machine, sized by what is free on them now.

    Each device counts its free memory (``torch.cuda.mem_get_info``) plus
    ``context_gib``: this process's own CUDA context is already taken out of the free
    figure once torch has touched the device, and the planner adds it back as a term
    of its own. The machine is planned on its smallest device (capped at its total).
    """
    import torch

    _, available = host_ram_gib()
    usable = []
    for index in indices:
        free, total = torch.cuda.mem_get_info(index)
        usable.append(min(free / GIB + context_gib, total / GIB))
    props = torch.cuda.get_device_properties(indices[0])
    return Machine(
        kind="cuda",
        count=len(indices),
        device_gib=min(usable),
        host_ram_gib=available,
        gpu=match_device_name(props.name, props.total_memory / GIB),
        device_name=props.name,
        detected=True,
    )
