"""Fingerprints that name a run folder before any weights are loaded.

A run folder (``lens_compare.store.RunFolder``) holds the finished shards of one
comparison so that an interrupted run can resume. Its name must change whenever
anything that shapes the numbers changes, and must be known before a model loads
(a resumed ``sequential`` run may skip the base model entirely), so it is derived
from files and settings, never from loaded weights:

- a local checkpoint (directory or ``.gguf``): a sampled content hash of every
  weight file. Files up to ``WHOLE_FILE_BYTES`` are hashed whole; larger ones by
  their size and ``SAMPLES`` evenly spaced blocks of ``BLOCK_BYTES``. Fine-tuning
  changes nearly every weight, so two checkpoints of the same shapes differ in
  practically every block; reading 4 MiB per file keeps a 140 GB checkpoint cheap.
- a hub id: the commit its config was read from (the snapshot folder of the
  local hub cache), which pins the exact weights transformers will download.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

from lens_compare.loading import ModelRef

WHOLE_FILE_BYTES = 64 * 2**20
SAMPLES = 1024
BLOCK_BYTES = 4096
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}".encode())
    with path.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
            return
        last = size - BLOCK_BYTES
        for sample in range(SAMPLES):
            handle.seek(last * sample // (SAMPLES - 1))
            digest.update(handle.read(BLOCK_BYTES))


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
    if ref.kind == "hub":
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


def token_ids_fingerprint(token_ids: tuple[tuple[int, ...], ...]) -> str:
    digest = hashlib.sha256()
    for ids in token_ids:
        digest.update(",".join(map(str, ids)).encode() + b";")
    return digest.hexdigest()[:16]

