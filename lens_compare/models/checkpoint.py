"""A safetensors checkpoint read tensor by tensor, straight to a device, with every byte counted.

Layer-streamed capture (``lens_compare.capture.streamed``) never loads a whole model: it reads
one block's tensors at a time through the checkpoint's weight map (the
``model.safetensors.index.json`` of a sharded checkpoint, or the single file's own
header) with ``safetensors.safe_open``. Headers are read first, so a missing file or
tensor, or a shape that disagrees with the config, is found before the first block is.

>>> checkpoint = SafetensorsCheckpoint.open(ref)                 # doctest: +SKIP
>>> checkpoint.read(["model.norm.weight"], "cpu")                # doctest: +SKIP
"""

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lens_compare.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONVERT_HINT = "convert it once with `python -m lens_compare.convert {spec} OUT_DIR` and pass OUT_DIR"
FETCH_HINT = "streaming downloads nothing: fetch the weights first (`hf download {repo}`) or pass a local directory"

@dataclass(frozen=True)
class TensorHeader:
    dtype: str
    shape: tuple[int, ...]


def checkpoint_directory(ref) -> Path:
    """The local directory holding ``ref``'s safetensors files (a hub id: its cached snapshot).

    Nothing is downloaded: streaming reads what is on disk (a ``demo:`` checkpoint must be built).
    """
    from lens_compare.models.loading import weights_ref

    ref = weights_ref(ref)
    if ref.kind == "gguf":
        raise CheckpointError(
            f"model {ref.spec!r} is a GGUF file, which cannot stream; " + CONVERT_HINT.format(spec=ref.spec)
        )
    if ref.kind == "hub":
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(ref.location, local_files_only=True))
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"model {ref.spec!r} is not in the local Hugging Face cache; " + FETCH_HINT.format(repo=ref.location)
            ) from None
    return Path(ref.location)


class SafetensorsCheckpoint:
    """One checkpoint's weight map and headers; ``read`` counts the bytes it reads."""

    def __init__(self, spec: str, directory: Path, weight_map: dict[str, str]):
        self.spec = spec
        self.directory = directory
        self.weight_map = weight_map
        self._headers: dict[str, TensorHeader] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0

    @classmethod
    def open(cls, ref) -> "SafetensorsCheckpoint":
        directory = checkpoint_directory(ref)
        index = directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(str(directory / SINGLE_FILE), "pt") as handle:
                weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        else:
            found = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            what = f"only {', '.join(found[:3])}" if found else "no model.safetensors or index"
            fix = FETCH_HINT.format(repo=ref.location) if ref.kind == "hub" and not found else \
                "streaming reads safetensors: " + CONVERT_HINT.format(spec=ref.spec)
            raise CheckpointError(f"model {ref.spec!r}: {str(directory)!r} has {what}; {fix}")
        missing = sorted({name for name in weight_map.values() if not (directory / name).is_file()})
        if missing:
            fix = FETCH_HINT.format(repo=ref.location) if ref.kind == "hub" else "download or copy the whole checkpoint"
            raise CheckpointError(
                f"model {ref.spec!r}: {INDEX_FILE} lists {len(missing)} file(s) missing from {str(directory)!r} "
                f"(first: {missing[0]}); {fix}"
            )
        return cls(ref.spec, directory, weight_map)

    @property
    def total_bytes(self) -> int:
        return sum((self.directory / name).stat().st_size for name in set(self.weight_map.values()))

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def headers(self, names: list[str]) -> dict[str, TensorHeader]:
        """Dtype and shape of each of ``names`` from the files' headers (no tensor data read)."""
        todo: dict[str, list[str]] = {}
        for name in names:
            if name not in self._headers:
                todo.setdefault(self.weight_map[name], []).append(name)
        for file, file_names in todo.items():
            with safe_open(str(self.directory / file), "pt") as handle:
                for name in file_names:
                    piece = handle.get_slice(name)
                    self._headers[name] = TensorHeader(piece.get_dtype(), tuple(piece.get_shape()))
        return {name: self._headers[name] for name in names}

    def read(self, names: list[str], device: str | torch.device) -> dict[str, torch.Tensor]:
        """The tensors ``names``, read straight to ``device``, in their stored dtype."""
        with self.reader(device) as get:
            return {name: get(name) for name in names}

    @contextmanager
    def reader(self, device: str | torch.device) -> Iterator[Callable[[str], torch.Tensor]]:
        """``get(name)`` reads one tensor to ``device``; each file is opened once per ``with``."""
        handles: dict[str, Any] = {}
        with ExitStack() as stack:
            def get(name: str) -> torch.Tensor:
                file = self.weight_map[name]
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(str(self.directory / file), "pt", device=str(device)))
                tensor = handles[file].get_tensor(name)
                with self._lock:
                    self.bytes_read += tensor.numel() * tensor.element_size()
                return tensor

            yield get
