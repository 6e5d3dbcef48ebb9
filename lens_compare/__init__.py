"""lens_compare: what supervised fine-tuning did to a model's residual stream, layer by layer.

>>> import lens_compare
>>> result = lens_compare.compare("smollm2-sanity", prompts=["Hello"])   # doctest: +SKIP
>>> result.summary(); result.to_dataframe()                             # doctest: +SKIP
"""

from lens_compare.api import compare
from lens_compare.capture import ResidualStates
from lens_compare.config import RunConfig
from lens_compare.errors import (
    CaptureError,
    CheckpointError,
    ConfigError,
    HardwareError,
    LensCompareError,
    ModelLoadError,
    PairError,
    TokenizationError,
)
from lens_compare.pairs import PairSpec, builtin_pairs, get_pair
from lens_compare.result import ComparisonResult
from lens_compare.saved import concat_runs, load_run

__all__ = [
    "CaptureError",
    "CheckpointError",
    "ComparisonResult",
    "ConfigError",
    "HardwareError",
    "LensCompareError",
    "ModelLoadError",
    "PairError",
    "PairSpec",
    "ResidualStates",
    "RunConfig",
    "TokenizationError",
    "builtin_pairs",
    "compare",
    "concat_runs",
    "get_pair",
    "load_run",
]
