"""lens_compare: what supervised fine-tuning did to a model's residual stream, layer by layer.

>>> import lens_compare
>>> result = lens_compare.compare("smollm2-sanity", prompts=["The capital of France is Paris."])  # doctest: +SKIP
>>> result.summary(); result.to_dataframe()                                                     # doctest: +SKIP

The public names below are imported on first use, so ``import lens_compare.<module>`` (the
planner's ``python -m lens_compare.plan``, say) does not pay for torch and pandas unless
that module needs them.
"""

import importlib

_PUBLIC = {
    "compare": "lens_compare.pipeline.api",
    "ResidualStates": "lens_compare.metrics.states",
    "RunConfig": "lens_compare.config",
    "CaptureError": "lens_compare.errors",
    "CheckpointError": "lens_compare.errors",
    "ConfigError": "lens_compare.errors",
    "HardwareError": "lens_compare.errors",
    "LensCompareError": "lens_compare.errors",
    "ModelLoadError": "lens_compare.errors",
    "PairError": "lens_compare.errors",
    "TokenizationError": "lens_compare.errors",
    "PairSpec": "lens_compare.models.pairs",
    "builtin_pairs": "lens_compare.models.pairs",
    "get_pair": "lens_compare.models.pairs",
    "ComparisonResult": "lens_compare.results.result",
    "concat_runs": "lens_compare.results.saved",
    "load_run": "lens_compare.results.saved",
    "verdict": "lens_compare.results.verdict",
    "sweep": "lens_compare.sweeps.api",
    # The figures, a module of functions (lens_compare.plots.layer_profile(result), ...).
    "plots": None,
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lens_compare' has no attribute {name!r}")
    module = _PUBLIC[name]
    value = importlib.import_module(f"lens_compare.{name}") if module is None else \
        getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
