"""The notebook entry point: ``lens_compare.compare``."""

from collections.abc import Sequence

from lens_compare.config import RunConfig
from lens_compare.pipeline import run_comparison
from lens_compare.preflight import memory_preflight
from lens_compare.progress import quiet_library_bars
from lens_compare.result import ComparisonResult


def compare(
    pair: str | None = None,
    prompts: Sequence[str] | str = (),
    *,
    base: str | None = None,
    sft: str | None = None,
    tokens: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    gpus: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
    skip_first: int = 0,
    chat_template: str = "none",
    include_first_token: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    components: bool = True,
    logit_lens: str | bool | Sequence[int | str] | None = "auto",
    top_tokens: int = 10,
    cka: bool = False,
    noise_floor: bool = False,
    batch_size: int = 8,
    strategy: str = "auto",
    shard_size: int | None = None,
    filler_text: str | None = None,
    keep_residuals: bool = False,
    check_memory: bool = True,
) -> ComparisonResult:
    """Compare a base model and its SFT sibling on ``prompts``; nothing is written to disk.

    >>> result = lens_compare.compare("smollm2-sanity", prompts=["The capital of France is"])
    >>> result.summary().query("metric == 'cosine'")      # doctest: +SKIP
    >>> result.to_dataframe()                               # doctest: +SKIP

    Every per-layer mean gets a 95% percentile bootstrap interval (``ci_low``, ``ci_high``)
    from ``bootstrap`` resamples of the prompts (of the tokens, with one prompt), drawn
    with ``seed``; ``bootstrap=0`` leaves them out.

    ``components`` also compares each block's attention and MLP outputs
    (``result.analysis_records("components")``, ``summary(hook="mlp_out")``). ``logit_lens``
    compares what each layer's stream predicts through both models' own final norm and
    unembedding: ``"auto"`` (every layer when the planner says that costs at most a quarter of the
    forward passes, else ``"final"``), ``"all"`` (or True), ``"final"`` (the models' actual outputs
    only), layers (``[0, 8, "last"]``), ``"off"`` (or False). ``top_tokens``: how many tokens
    ``result.top_tokens()`` lists per layer (0: none). ``cka``: linear CKA between every
    base and every SFT layer (``result.cka``). ``noise_floor`` runs the SFT model once more in a
    second precision (``result.noise_floor``; every record gets ``clears_noise``).

    ``check_memory`` asks the hardware planner first and refuses a run whose
    weights cannot fit on this machine (instead of failing halfway through loading).
    ``strategy`` is ``auto`` (the planner's pick), ``resident``, ``sequential``,
    ``nf4`` or ``stream`` (layer by layer from safetensors checkpoints); ``gpus`` restricts a CUDA run to those devices (split by whole blocks when
    one GPU cannot hold a model). Everything stays in memory: for hours-long prompt
    sets use the CLI, whose run folder resumes after an interruption.
    """
    quiet_library_bars()
    if gpus and device == "cpu":
        device = "cuda"  # naming GPUs asks for them
    config = RunConfig.from_dict({
        key: value for key, value in {
            "pair": pair, "base_model": base, "sft_model": sft,
            "prompts": [prompts] if isinstance(prompts, str) else list(prompts),
            "tokens": tokens, "dtype": dtype, "device": device,
            "gpus": list(gpus) if gpus is not None else None, "shard_size": shard_size,
            "layers": list(layers) if layers is not None else None, "skip_first": skip_first,
            "chat_template": chat_template, "include_first_token": include_first_token,
            "bootstrap": bootstrap, "seed": seed, "components": components,
            "logit_lens": logit_lens, "top_tokens": top_tokens, "cka": cka, "noise_floor": noise_floor,
            "batch_size": batch_size, "strategy": strategy, "filler_text": filler_text,
        }.items() if value is not None
    })
    preflight = memory_preflight if check_memory else None
    return run_comparison(config, preflight=preflight, keep_residuals=keep_residuals)
