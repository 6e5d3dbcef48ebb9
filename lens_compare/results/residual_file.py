"""The ``--save-residuals`` file, written tensor by tensor straight from the run's shards.

Keys: ``{base,sft}/blocks.{l}.hook_resid_{pre,post}``, each ``[prompt, pos, d_model]``
in the model dtype with zeros at padding positions, plus ``token_ids`` ``[prompt, pos]``
(int64) and ``attention_mask`` (int8, 1 for real tokens), so every metric can be
recomputed independently. Safetensors cannot alias, so the shared states are
written under both hook names.

The file is the standard safetensors layout (8-byte little-endian header length,
JSON header, raw little-endian data), written here without ever holding more than
one shard's slice of one state in memory: a run too large for RAM still gets its
residuals file.
"""

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import einops
import torch
from jaxtyping import Bool, Int
from torch import Tensor

from lens_compare.util.hooks import HOOK_KINDS, hook_name, state_index
from lens_compare.util.outputs import write_atomically

_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                torch.int64: "I64", torch.int8: "I8"}

# (role, state, shard) -> that shard's [prompt, pos, d_model] slice of one state.
StateSlice = Callable[[str, int, int], Tensor]


def _bytes(tensor: Tensor) -> bytes:
    flat = einops.rearrange(tensor.contiguous(), "... -> (...)")
    return flat.view(torch.uint8).numpy().tobytes()


def _state_chunks(state_slice: StateSlice, role: str, state: int, bounds, width: int) -> Iterator[bytes]:
    for shard in range(len(bounds)):
        part = state_slice(role, state, shard)
        yield _bytes(torch.nn.functional.pad(part, (0, 0, 0, width - part.shape[1])))


def write_residual_file(
    path: Path,
    *,
    token_ids: Int[Tensor, "prompt pos"],
    real: Bool[Tensor, "prompt pos"],
    layers: tuple[int, ...],
    dtypes: dict[str, torch.dtype],
    d_model: int,
    bounds: tuple[tuple[int, int], ...],
    state_slice: StateSlice,
    metadata: dict[str, str],
) -> Path:
    """Write the residuals file atomically; ``state_slice`` reads one shard's slice of a state."""
    n_prompts, width = token_ids.shape
    entries: list[tuple[str, torch.dtype, list[int], Callable[[], Iterator[bytes]]]] = [
        ("token_ids", torch.int64, [n_prompts, width], lambda: iter([_bytes(token_ids.long())])),
        ("attention_mask", torch.int8, [n_prompts, width], lambda: iter([_bytes(real.to(torch.int8))])),
    ]
    for role in ("base", "sft"):
        for kind in HOOK_KINDS:
            for layer in layers:
                state = state_index(kind, layer)
                entries.append((
                    f"{role}/{hook_name(kind, layer)}", dtypes[role], [n_prompts, width, d_model],
                    lambda role=role, state=state: _state_chunks(state_slice, role, state, bounds, width),
                ))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape, _ in entries:
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for name, _, _, chunks in entries:
                expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                written = 0
                for chunk in chunks():
                    handle.write(chunk)
                    written += len(chunk)
                if written != expected:
                    raise RuntimeError(f"{name}: wrote {written} bytes, expected {expected}")

    return write_atomically(path, write)
