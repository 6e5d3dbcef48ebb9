"""One exception hierarchy for everything lens_compare refuses to do.

Every message names the offending value, the form that was expected and, where
there is one, the fix. The CLI prints ``str(error)`` as its one-line reason.
"""


class LensCompareError(Exception):
    """Base class: any error lens_compare raises on purpose."""


class ConfigError(LensCompareError):
    """A config file, config value or CLI flag is malformed or inconsistent."""


class PairError(LensCompareError):
    """An unknown pair key or a malformed pair entry."""


class ModelLoadError(LensCompareError):
    """A model reference cannot be resolved or loaded."""


class TokenizationError(LensCompareError):
    """Prompts cannot be turned into identical token ids for both models."""


class CaptureError(LensCompareError):
    """The residual stream could not be captured as requested."""


class HardwareError(LensCompareError):
    """The hardware at hand cannot run the request (planner or local_run guard)."""


class UnsupportedArchitectureError(ConfigError):
    """The hardware planner has no layout rule for this model family."""


class CheckpointError(ModelLoadError):
    """A checkpoint's files disagree with its index or its config, or cannot be streamed."""
