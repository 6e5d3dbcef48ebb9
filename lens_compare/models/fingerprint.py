"""Fingerprints that name a run folder before any weights are loaded.

A run folder (``lens_compare.engines.store.RunFolder``) holds the finished shards of one
comparison so that an interrupted run can resume. Its name must change whenever
anything that shapes the numbers changes, and must be known before a model loads
(a resumed ``sequential`` run may skip the base model entirely), so it is derived
from files and settings, never from loaded weights:

- a local checkpoint (directory or ``.gguf``): a content hash of every weight file.
  Files up to ``WHOLE_FILE_BYTES`` are hashed whole. Larger safetensors files are
  hashed by their header (every tensor's name, dtype, shape and offsets), every
  tensor up to ``SMALL_TENSOR_BYTES`` whole (norms, biases, routers: a fine-tune that
  touches only those is still told apart) and four evenly spaced ``BLOCK_BYTES`` of
  every larger tensor (a fine-tune or a merged LoRA changes the whole matrix). Other
  large files are hashed by ``SAMPLES`` evenly spaced blocks. A 140 GB checkpoint
  costs a few tens of MB of reads.
- a ``demo:`` checkpoint: its cache key (the recipe, its code version and the source
  model's fingerprint), the same before and after it is built;
- a hub id: the commit its config was read from (the snapshot folder of the
  local hub cache), which pins the exact weights transformers will download.
"""

import functools
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from lens_compare.models.refs import ModelRef

WHOLE_FILE_BYTES = 64 * 2**20
SMALL_TENSOR_BYTES = 256 * 2**10
SAMPLES = 1024
BLOCK_BYTES = 4096
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _file_digest(path: Path, digest) -> None:
    stat = path.stat()
    digest.update(_sampled_digest(str(path), stat.st_size, stat.st_mtime_ns))


@functools.cache
def _sampled_digest(path: str, size: int, mtime_ns: int) -> bytes:
    """The content hash of one file (memoized per size and modification time within a process)."""
    digest = hashlib.sha256(f"{Path(path).name}:{size}".encode())
    with open(path, "rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
        elif path.endswith(".safetensors"):
            _safetensors_samples(handle, digest)
        else:
            last = size - BLOCK_BYTES
            for sample in range(SAMPLES):
                handle.seek(last * sample // (SAMPLES - 1))
                digest.update(handle.read(BLOCK_BYTES))
    return digest.digest()


def _safetensors_samples(handle, digest) -> None:
    (length,) = struct.unpack("<Q", handle.read(8))
    header = handle.read(length)
    digest.update(header)
    entries = json.loads(header)
    data_start = 8 + length
    for name in sorted(k for k in entries if k != "__metadata__"):
        start, end = entries[name]["data_offsets"]
        size = end - start
        if size <= SMALL_TENSOR_BYTES:
            offsets, block = [start], size
        else:
            offsets = [start + (size - BLOCK_BYTES) * k // 3 for k in range(4)]
            block = BLOCK_BYTES
        for offset in offsets:
            handle.seek(data_start + offset)
            digest.update(handle.read(block))


def weight_files(ref: ModelRef) -> list[Path]:
    """The files that hold ``ref``'s weights (local references only)."""
    if ref.kind == "gguf":
        return [Path(ref.location) / ref.gguf_file]
    directory = Path(ref.location)
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _hub_revision(repo_id: str) -> str | None:
    """The commit of the cached snapshot ``config.json`` was read from, if it is cached."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(found, str):
        return Path(found).parent.name
    return None


def checkpoint_fingerprint(ref: ModelRef) -> str:
    """16 hex digits that change whenever ``ref``'s weights do (see the module docstring)."""
    digest = hashlib.sha256()
    if ref.kind == "demo":
        digest.update(f"demo:{Path(ref.location).name}".encode())
    elif ref.kind == "hub":
        revision = _hub_revision(ref.location)
        digest.update(f"hub:{ref.location}@{revision or 'uncached'}".encode())
    else:
        for path in weight_files(ref):
            _file_digest(path, digest)
    return digest.hexdigest()[:16]


def document_fingerprint(document: Any) -> str:
    """sha256 (16 hex digits) of a JSON-able document, independent of key order."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def code_fingerprint() -> str:
    """sha256 (16 hex digits) of lens_compare's own source: a run folder written by other code
    (a fix to a metric, say) is never resumed, even under the same version number."""
    digest = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent  # the package, not models/
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def token_ids_fingerprint(token_ids: tuple[tuple[int, ...], ...]) -> str:
    digest = hashlib.sha256()
    for ids in token_ids:
        digest.update(",".join(map(str, ids)).encode() + b";")
    return digest.hexdigest()[:16]

