"""CLI: ``python -m lens_compare.run --pair llama8b [options]``.

Exit code 0 on success; on any error, a one-line reason on stderr and exit code 1
(2 for bad command-line syntax). Config values come from ``--config PATH`` or,
without it, from ``configs/dev_config.yaml`` when ``DEV_MODE=true`` and
``configs/prod_config.yaml`` otherwise; flags override them.
"""

import argparse
import dataclasses
import logging
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from lens_compare.config import RunConfig, default_config_path, load_config_file
from lens_compare.engines import Job
from lens_compare.errors import LensCompareError
from lens_compare.fingerprint import document_fingerprint
from lens_compare.saved import load_run
from lens_compare.loading import DTYPES
from lens_compare.outputs import check_export_formats, check_output_dir, write_frame, write_json
from lens_compare.pairs import builtin_pairs
from lens_compare.pipeline import (
    assemble,
    check_spill_space,
    execute,
    make_job,
    run_manifest,
    start_run,
    summary_line,
)
from lens_compare.preflight import memory_preflight
from lens_compare.residual_file import write_residual_file
from lens_compare.store import STATE_KINDS, Kind, RunFolder
from lens_compare.verdict import verdict

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
    p.add_argument("--tokens", type=int, help="make every prompt exactly N tokens: longer ones are cut, shorter "
                                               "ones padded with --filler-text (else refused)")
    p.add_argument("--filler-text", metavar="TEXT",
                   help="text appended, repeated, to prompts shorter than --tokens (e.g. 'The history of science')")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--gpus", help="CUDA devices to split models over, e.g. 0,1,2,3 (default: all visible)")
    p.add_argument("--layers", help="comma-separated layer indices to capture, e.g. 0,5,10")
    p.add_argument("--skip-first", type=int, help="do not capture the first K layers")
    p.add_argument("--chat-template", choices=("none", "sft"))
    p.add_argument("--include-first-token", action="store_true", default=None,
                   help="include position 0 in the per-layer aggregates")
    p.add_argument("--bootstrap", type=int, metavar="N",
                   help="resamples of the 95%% bootstrap interval of every per-layer mean (default 1000; 0: none)")
    p.add_argument("--seed", type=int, help="seed of the bootstrap resamples (default 0; recorded in the provenance)")
    p.add_argument("--components", action=argparse.BooleanOptionalAction, default=None,
                   help="also compare each block's attention and MLP outputs (default: on)")
    p.add_argument("--logit-lens", nargs="?", const="all", metavar="MODE",
                   help="compare what each layer predicts through both models' final norm and unembedding: "
                        "all (the default with the flag alone), final (the models' outputs only), layers like "
                        "0,8,16,last, or auto (the default: every layer when that costs at most a quarter of the "
                        "forward passes, else final)")
    p.add_argument("--no-logit-lens", dest="logit_lens", action="store_const", const="off",
                   help="no logit lens at all (same as --logit-lens off)")
    p.add_argument("--top-tokens", type=int, metavar="K",
                   help="list per layer the K tokens whose stream moved most (relative_l2; default 10, 0: none)")
    p.add_argument("--cka", action="store_true", default=None,
                   help="linear CKA (and its debiased estimator) between every base and every SFT layer's resid_post; "
                        "keeps every captured state until the end")
    p.add_argument("--noise-floor", action="store_true", default=None,
                   help="run the SFT model once more in a second precision (float32 for a 16-bit run, bfloat16 for "
                        "float32) and report each layer's drift against that numerical noise (clears_noise)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--strategy", choices=("auto", "resident", "sequential", "nf4", "stream"),
                   help="how to run the pair (default auto: the planner's pick among resident, sequential "
                        "and stream; nf4 only when asked)")
    p.add_argument("--shard-size", type=int,
                   help="prompts per shard, the unit of progress and resume (default: ~2 GiB of residuals; "
                        "a streamed run resumes block by block within a shard)")
    p.add_argument("--save-residuals", action="store_true", default=None,
                   help="also write the captured residuals to a .safetensors file")
    p.add_argument("--parquet", action="store_true", help="also write the token and summary tables as parquet")
    p.add_argument("--csv", action="store_true", help="also write the token and summary tables as csv")
    p.add_argument("--plots", action="store_true",
                   help="also write the standard figures as PNG beside the JSON (needs the plots extra)")
    p.add_argument("--noise-floor-run", metavar="RUN_JSON",
                   help="a saved run (e.g. of smollm2-dtype) to read the drift against: a column of the "
                        "verdict and a band in the --plots figures")
    p.add_argument("--out", help="output directory")
    p.add_argument("--list-pairs", action="store_true", help="print the registered pairs and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    path = args.config or default_config_path()
    config = load_config_file(path) if path else RunConfig()
    if path:
        how = "--config" if args.config else f"DEV_MODE={os.environ.get('DEV_MODE', '')!r} found it in ./configs"
        logger.info("config file: %s (%s); its values replace the built-in defaults, flags replace both",
                    path, how)
    else:
        logger.info("config file: none; built-in defaults (lens_compare.config.RunConfig), flags replace them")
    changes = {
        "pairs_file": args.pairs_file, "tokens": args.tokens, "filler_text": args.filler_text, "dtype": args.dtype,
        "device": args.device, "skip_first": args.skip_first, "chat_template": args.chat_template,
        "include_first_token": args.include_first_token, "batch_size": args.batch_size,
        "strategy": args.strategy, "save_residuals": args.save_residuals, "output_dir": args.out,
        "shard_size": args.shard_size, "bootstrap": args.bootstrap, "seed": args.seed,
        "components": args.components, "logit_lens": args.logit_lens,
        "top_tokens": args.top_tokens, "cka": args.cka,
        "noise_floor": args.noise_floor,
    }
    if args.pair:
        changes.update(pair=args.pair, base_model=None, sft_model=None)
    if args.base or args.sft:
        changes.update(pair=None, base_model=args.base, sft_model=args.sft)
    if args.prompt:
        changes.update(prompts=list(args.prompt), prompts_file=None)
    if args.prompts_file:
        changes.update(prompts=[], prompts_file=args.prompts_file)
    if args.gpus:
        try:
            changes["gpus"] = [int(x) for x in args.gpus.split(",")]
        except ValueError:
            raise LensCompareError(f"--gpus {args.gpus!r}: expected comma-separated CUDA indices like 0,1,2,3") from None
        if args.device is None and not str(config.device).startswith("cuda"):
            changes["device"] = "cuda"
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


def write_outputs(result, config: RunConfig, stem: Path, job: Job, folder: RunFolder) -> list[Path]:
    written = [write_json(stem.with_suffix(".json"), result.to_dict())]
    if config.export:
        tables = {"tokens": result.to_dataframe(), "summary": result.summary()}
        for fmt in config.export:
            for name, frame in tables.items():
                written.append(write_frame(stem.with_name(f"{stem.name}.{name}.{fmt}"), frame, fmt))
    if config.save_residuals:
        run = job.run
        written.append(write_residual_file(
            stem.with_suffix(".safetensors"),
            token_ids=job.token_ids.masked_fill(~job.real, 0), real=job.real, layers=run.layers,
            dtypes={side.role: DTYPES[side.dtype] for side in run.sides},
            d_model=result.provenance["d_model"], bounds=job.layout.bounds,
            state_slice=lambda role, state, shard: folder.get(Kind.STATE, role=role, shard=shard, state=state),
            metadata={"pair": str(result.provenance["pair"]), "layers": ",".join(map(str, result.layers))},
        ))
    return written


def _folder_name(pair: str, manifest: dict) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', pair)}-{document_fingerprint(manifest)}"


def _first_plan(folder: RunFolder, execution):
    """The plan a run folder's run started with: a resumed or repeated run reports it, and sizes its
    logit lens's chunks as the first did (the same numbers, whatever memory is free now)."""
    if not folder.has(Kind.PLAN):
        folder.put(Kind.PLAN, {"estimate": execution.estimate, "lens_chunk_bytes": execution.lens_chunk_bytes})
        return execution
    recorded = folder.get(Kind.PLAN)
    return dataclasses.replace(execution, estimate=recorded["estimate"], lens_chunk_bytes=recorded["lens_chunk_bytes"])


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # huggingface_hub prints through its own handler and propagates to ours: once is enough.
    logging.getLogger("huggingface_hub").propagate = False
    if args.list_pairs:
        for key, spec in builtin_pairs().items():
            print(f"{key:16s} {spec.base}  <->  {spec.sft}")
        return 0
    folder = None
    try:
        config = resolve_config(args)
        logger.info("config (the values that differ from the built-in defaults; the JSON's provenance has all): %s",
                    ", ".join(f"{key}={value!r}" for key, value in config.to_dict().items()
                              if key != "config_file" and value != RunConfig().to_dict()[key]) or "none")
        out_dir = Path(config.output_dir)
        check_output_dir(out_dir)
        check_export_formats(config.export)
        if args.plots:
            from lens_compare.plots import require_matplotlib

            require_matplotlib()
        floor = load_run(args.noise_floor_run) if args.noise_floor_run else None
        run, layout, execution = start_run(config, preflight=memory_preflight, held_in_memory=False)
        # CKA reads every captured state at the end, the noise floor the SFT model's.
        keep = config.save_residuals or config.cka or config.noise_floor
        manifest = run_manifest(run, layout, execution, keep)
        check_spill_space(make_job(run, layout, execution, keep_states=keep), execution, out_dir)
        folder = RunFolder(out_dir / "runs" / _folder_name(run.pair, manifest), manifest)
        execution = _first_plan(folder, execution)
        job = make_job(run, layout, execution, keep_states=keep)
        found = len(folder.keys(Kind.METRICS))
        spilled = len(folder.keys(Kind.STATES, role="base"))
        if found == layout.count:
            state = "; all finished: assembling the outputs without loading a model"
        else:
            state = "; resuming" if found or spilled else ""
        logger.info("run folder %s: %d of %d shard(s) already finished%s%s", folder.path, found, layout.count,
                    f", {spilled} base shard(s) spilled" if spilled else "", state)
        earlier = folder.get(Kind.OUTPUTS) if folder.has(Kind.OUTPUTS) else None
        nothing_pending = found == layout.count and not (
            job.noise_floor and not all(folder.has(Kind.NOISE, shard=shard) for shard in range(layout.count)))
        seconds = execute(job, execution, folder)
        logger.info("assembling the result from %d shard(s): per-layer aggregates%s", layout.count,
                    f" with {config.bootstrap} bootstrap resamples each" if config.bootstrap else "")
        result = assemble(run, job, execution, folder, keep_residuals=False)
        if floor is None:  # --noise-floor-run names another run's floor; else this run's own, if measured
            floor = result.noise_floor
        # One set of outputs per run folder: a rerun that only reassembles (or resumes) writes the
        # same files again, under the stem of the folder's first outputs, instead of a new set.
        reused = earlier is not None and nothing_pending
        if earlier is None:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            earlier = {"stem": f"lens_compare_{result.provenance['pair']}_{stamp}", "seconds": 0.0}
        run_seconds = earlier["seconds"] if reused else earlier["seconds"] + seconds
        folder.put(Kind.OUTPUTS, {"stem": earlier["stem"], "seconds": run_seconds})
        stem = out_dir / earlier["stem"]
        if reused:
            logger.info("every shard was already in the run folder: its outputs are rewritten in place (%s.*), "
                        "not written again under a new name", stem)
        for path in write_outputs(result, config, stem, job, folder):
            print(path)
        if args.plots:
            from lens_compare.plots import save_standard_figures

            logger.info("drawing the figures")
            for path in save_standard_figures(result, stem, noise_floor=floor):
                print(path)
        if not config.save_residuals:
            for kind in STATE_KINDS:
                folder.drop(kind)
        logger.info("verdict:\n%s", verdict(result, noise_floor=floor))
        logger.info(summary_line(run, execution, job, seconds, run_seconds if reused else None))
        return 0
    except LensCompareError as error:
        print(f"lens_compare: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        kept = f"; finished shards (and a streamed run's finished blocks) are kept in {folder.path}: " \
            "run the same command again to resume" \
            if folder is not None else "; no output was written"
        print(f"lens_compare: interrupted{kept}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    from lens_compare.cli import exit_with

    exit_with(main)
