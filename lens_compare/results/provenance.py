"""Where a result came from: the ``provenance`` block of its JSON, as a typed record.

A run's provenance names the pair, both models (reference, dtype, a hash of the weights), how
it ran (device, strategy, shards, the plan), what it read (prompts, token ids) and the resolved
config. A noise floor read as a result of its own (``kind="noise_floor"``) has the few fields
that describe it. Code reads the fields; a notebook may still read it as the JSON's mapping:

>>> provenance = floor_provenance("pkg:m.gguf", {"base": "float32", "sft": "bfloat16"}, 30)
>>> provenance.pair, provenance["pair"], provenance.n_layers
('sft float32 vs bfloat16', 'sft float32 vs bfloat16', 30)
"""

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# The JSON's keys, in the order a run writes them; a noise floor writes FLOOR_KEYS.
RUN_KEYS = (
    "versions", "pair", "base_model", "sft_model", "dtype", "device", "gpus", "strategy", "schedule",
    "quantization", "placement", "shards", "n_layers", "model_types", "d_model", "layers", "chat_template",
    "tokenizer", "prompts", "texts", "token_ids", "token_content", "untrained_base_tokens", "bootstrap",
    "logit_lens", "difference_lens", "steering", "plan", "timestamp", "config_file", "config",
)
FLOOR_KEYS = ("kind", "pair", "model", "base_model", "sft_model", "dtype", "n_layers", "strategy", "device")


@dataclass(frozen=True)
class Provenance(Mapping):
    """A result's provenance (see the module docstring); every field but the first few may be
    missing from a run saved by an older lens_compare (None then)."""

    # The pair's registry key (or "custom"); a noise floor's "sft <dtype> vs <dtype>".
    pair: str
    n_layers: int
    # Per model: reference, kind, location, gguf_file, seed_id, dtype, weights_sha256_16.
    base_model: dict[str, Any]
    sft_model: dict[str, Any]
    # The dtype each model ran in, by role.
    dtype: dict[str, str]
    device: str | None = None
    strategy: str | None = None
    # "run", or "noise_floor" for the SFT model against itself in a second precision.
    kind: str = "run"
    # A noise floor's SFT model reference.
    model: str | None = None
    versions: dict[str, str] | None = None
    gpus: list[int] | None = None
    schedule: str | None = None
    quantization: dict[str, Any] | None = None
    placement: dict[str, Any] | None = None
    shards: dict[str, int] | None = None
    model_types: dict[str, str] | None = None
    d_model: int | None = None
    layers: list[int] | None = None
    chat_template: str | None = None
    # Whose tokenizer gave the ids both models saw: "base", or "sft" (--tokenizer sft); None in runs
    # saved before the option, which were all "base".
    tokenizer: str | None = None
    prompts: list[str] | None = None
    # What was tokenized, when a chat template (or filler text) changed the prompts.
    texts: list[str] | None = None
    token_ids: list[list[int]] | None = None
    # With a chat template: 1 where a token is the user's content, 0 where the template wrote it.
    token_content: list[list[int]] | None = None
    untrained_base_tokens: list[dict[str, Any]] | None = None
    bootstrap: dict[str, int] | None = None
    logit_lens: dict[str, Any] | None = None
    difference_lens: dict[str, Any] | None = None
    # Whether the steering check ran, and why, its layers, multiples and held-out prompts
    # (lens_compare.hardware.steering); None in runs saved before its auto mode.
    steering: dict[str, Any] | None = None
    plan: dict[str, Any] | None = None
    timestamp: str | None = None
    config_file: str | None = None
    config: dict[str, Any] | None = None
    # Keys this version does not know (a newer run's), kept so that a saved run reads back whole.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_noise_floor(self) -> bool:
        return self.kind == "noise_floor"

    def to_dict(self) -> dict[str, Any]:
        """The JSON's provenance block."""
        keys = FLOOR_KEYS if self.is_noise_floor else RUN_KEYS
        return {**{key: getattr(self, key) for key in keys}, **self.extra}

    @classmethod
    def from_dict(cls, document: Mapping[str, Any]) -> "Provenance":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in document.items() if k in known},
                   extra={k: v for k, v in document.items() if k not in known})

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


def floor_provenance(model: str | None, dtypes: dict[str, str], n_layers: int,
                     run: Provenance | None = None) -> Provenance:
    """The provenance of a noise floor as a result of its own: the SFT model ``model`` in its run
    precision (``dtypes["base"]``, the floor's "base" side) against itself in the second one
    (``dtypes["sft"]``); ``run``, the run's own provenance, lends the strategy and device."""
    side = {"reference": model, "kind": "noise floor"}
    return Provenance(
        kind="noise_floor",
        pair=f"sft {dtypes['base']} vs {dtypes['sft']}",
        model=model,
        base_model={**side, "dtype": dtypes["base"]},
        sft_model={**side, "dtype": dtypes["sft"]},
        dtype=dict(dtypes),
        n_layers=n_layers,
        strategy=None if run is None else run.strategy,
        device=None if run is None else run.device,
    )
