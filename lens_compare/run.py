"""CLI: ``python -m lens_compare.run --pair llama8b [options]``.

Exit code 0 on success; on any error, a one-line reason on stderr and exit code 1
(2 for bad command-line syntax). Config values come from ``--config PATH`` or,
without it, from ``configs/dev_config.yaml`` when ``DEV_MODE=true`` and
``configs/prod_config.yaml`` otherwise; flags override them.
"""

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from lens_compare.config import RunConfig, default_config_path, load_config_file
from lens_compare.errors import LensCompareError
from lens_compare.outputs import (
    check_export_formats,
    check_output_dir,
    residual_tensors,
    write_frame,
    write_json,
    write_residuals,
)
from lens_compare.pairs import builtin_pairs
from lens_compare.pipeline import run_comparison
from lens_compare.preflight import memory_preflight

logger = logging.getLogger("lens_compare")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lens_compare.run", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with a residual_compare: block")
    p.add_argument("--pair", help="registered pair key (see --list-pairs)")
    p.add_argument("--pairs-file", help="YAML file declaring extra pairs")
    p.add_argument("--base", help="base model: hub id, save_pretrained directory or .gguf file")
    p.add_argument("--sft", help="SFT model: hub id, save_pretrained directory or .gguf file")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="prompts, one per line (.txt) or {\"prompt\": ...} per line (.jsonl)")
    p.add_argument("--tokens", type=int, help="make every prompt exactly N tokens")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--layers", help="comma-separated layer indices to capture, e.g. 0,5,10")
    p.add_argument("--skip-first", type=int, help="do not capture the first K layers")
    p.add_argument("--chat-template", choices=("none", "sft"))
    p.add_argument("--include-first-token", action="store_true", default=None,
                   help="include position 0 in the per-layer aggregates")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--strategy", choices=("auto", "resident", "sequential"))
    p.add_argument("--save-residuals", action="store_true", default=None,
                   help="also write the captured residuals to a .safetensors file")
    p.add_argument("--parquet", action="store_true", help="also write the token and summary tables as parquet")
    p.add_argument("--csv", action="store_true", help="also write the token and summary tables as csv")
    p.add_argument("--out", help="output directory")
    p.add_argument("--list-pairs", action="store_true", help="print the registered pairs and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    path = args.config or default_config_path()
    config = load_config_file(path) if path else RunConfig()
    if path:
        logger.info("config: %s", path)
    changes = {
        "pairs_file": args.pairs_file, "tokens": args.tokens, "dtype": args.dtype,
        "device": args.device, "skip_first": args.skip_first, "chat_template": args.chat_template,
        "include_first_token": args.include_first_token, "batch_size": args.batch_size,
        "strategy": args.strategy, "save_residuals": args.save_residuals, "output_dir": args.out,
    }
    if args.pair:
        changes.update(pair=args.pair, base_model=None, sft_model=None)
    if args.base or args.sft:
        changes.update(pair=None, base_model=args.base, sft_model=args.sft)
    if args.prompt:
        changes.update(prompts=list(args.prompt), prompts_file=None)
    if args.prompts_file:
        changes.update(prompts=[], prompts_file=args.prompts_file)
    if args.layers:
        try:
            changes.update(layers=[int(x) for x in args.layers.split(",")], skip_first=0)
        except ValueError:
            raise LensCompareError(f"--layers {args.layers!r}: expected comma-separated integers like 0,5,10") from None
    export = [fmt for fmt, on in (("parquet", args.parquet), ("csv", args.csv)) if on]
    if export:
        changes["export"] = sorted(set(config.export) | set(export))
    merged = config.to_dict()
    for key, value in changes.items():
        if key in ("pair", "base_model", "sft_model") or value is not None:
            merged[key] = value
    return RunConfig.from_dict(merged)


def write_outputs(result, config: RunConfig, stem: Path) -> list[Path]:
    written = [write_json(stem.with_suffix(".json"), result.to_dict())]
    if config.export:
        tables = {"tokens": result.to_dataframe(), "summary": result.summary()}
        for fmt in config.export:
            for name, frame in tables.items():
                written.append(write_frame(stem.with_name(f"{stem.name}.{name}.{fmt}"), frame, fmt))
    if config.save_residuals:
        base, sft = result.residuals
        tensors = residual_tensors(base, sft, result.layers, *result.tokens.padded(0))
        meta = {"pair": str(result.provenance["pair"]), "layers": ",".join(map(str, result.layers))}
        written.append(write_residuals(stem.with_suffix(".safetensors"), tensors, meta))
    return written


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.list_pairs:
        for key, spec in builtin_pairs().items():
            print(f"{key:16s} {spec.base}  <->  {spec.sft}")
        return 0
    try:
        config = resolve_config(args)
        logger.info("resolved config: %s", config.to_dict())
        out_dir = Path(config.output_dir)
        check_output_dir(out_dir)
        check_export_formats(config.export)
        result = run_comparison(config, preflight=memory_preflight, keep_residuals=config.save_residuals)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        stem = out_dir / f"lens_compare_{result.provenance['pair']}_{stamp}"
        for path in write_outputs(result, config, stem):
            print(path)
        return 0
    except LensCompareError as error:
        print(f"lens_compare: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("lens_compare: interrupted; no partial output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
