"""GGUF checkpoints, read once: their config, tokenizer and dequantized weights kept as a
``save_pretrained`` directory in the cache, which every later run reads instead.

transformers reads a GGUF file slowly: parsing its header (the whole vocabulary, one string at
a time) and mapping its tensor names take most of it, dequantizing little (SmolLM2-135M: 5 s
for the config, 3.4 s for the tokenizer, 14 s for the weights, of which 1.6 s dequantizing, on
two cores). So the first use writes, into ``$LENS_COMPARE_CACHE/gguf/<file fingerprint>-...``:

- ``-files``: the config and the tokenizer (chat template included), when a run first reads
  them, before any weight is loaded;
- ``-float32``: the weights, dequantized to float32 as transformers dequantizes them, when a
  model is first loaded. Every dtype loads from it (float32 to bfloat16 or float16 rounds as
  the cast after dequantizing did): the same weights bit for bit, tested.

Each entry is built in a temporary folder and renamed into place (``lens_compare.util.cache``), so an
interrupted build leaves nothing half-written. The float32 copy takes 4 bytes per parameter of
disk; it is skipped, with a log line, when the cache's disk cannot hold twice that.
"""

import logging
import shutil
from pathlib import Path

from lens_compare.errors import LensCompareError
from lens_compare.util.cache import build_once, cache_root

logger = logging.getLogger("lens_compare")

# The cache's disk must have this many times the float32 copy free for it to be written.
DISK_HEADROOM = 2.0


def _entry(ref, suffix: str) -> Path:
    from lens_compare.models.fingerprint import checkpoint_fingerprint

    return cache_root() / "gguf" / f"{checkpoint_fingerprint(ref)}-{suffix}"


def files_dir(ref) -> Path:
    """The GGUF's config and tokenizer as a ``save_pretrained`` directory, written on first use."""
    def build(directory: Path) -> None:
        from transformers import AutoConfig, AutoTokenizer

        logger.info("reading the config and tokenizer of %s once (GGUF), into %s", ref, directory.parent)
        AutoConfig.from_pretrained(ref.location, gguf_file=ref.gguf_file).save_pretrained(str(directory))
        AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file).save_pretrained(str(directory))

    return build_once(_entry(ref, "files"), build)


def weights_cached(ref) -> bool:
    """Whether the GGUF's dequantized weights are in the cache already (no dequantizing to plan for)."""
    return _entry(ref, "float32").is_dir()


def weights_dir(ref, config, model_kwargs: dict) -> Path | None:
    """The GGUF's weights dequantized to float32, as a ``save_pretrained`` directory, written on first
    use; None (the caller reads the GGUF itself) when the cache's disk cannot hold them."""
    target = _entry(ref, "float32")
    if target.is_dir():
        return target
    from lens_compare.models.architecture import architecture_from_config
    from lens_compare.models.params import count_params

    try:
        need = count_params(architecture_from_config(config)).total * 4
    except LensCompareError:  # an architecture the planner does not model: ~8x a 4-bit file
        need = 8 * (Path(ref.location) / ref.gguf_file).stat().st_size
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < DISK_HEADROOM * need:
        logger.info("not caching the dequantized weights of %s (%.1f GiB in float32; %s has %.1f GiB free): "
                    "the GGUF is read again next time", ref, need / 2**30, target.parent, free / 2**30)
        return None

    def build(directory: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig

        from lens_compare.util.progress import gguf_bar_quiet_in_notebook

        logger.info("dequantizing %s once to float32 (%.2f GiB), into %s", ref, need / 2**30, directory.parent)
        with gguf_bar_quiet_in_notebook():
            model = AutoModelForCausalLM.from_pretrained(
                ref.location, gguf_file=ref.gguf_file, config=config, dtype=torch.float32,
                quantization_config=GgufConfig(dequantize=True), **model_kwargs)
        model.config._attn_implementation = None
        model.save_pretrained(str(directory))
        del model

    return build_once(target, build)
