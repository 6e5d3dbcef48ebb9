"""What an engine learns from one model's weights once it has them (``ModelFacts``).

Every engine records them in the store (``store.put(Kind.FACTS, ...)``, as JSON: a run folder keeps
them in ``models/<role>.json``) when it first reads a model; the result's provenance and
its untrained-token warning are read from them.
"""

from dataclasses import asdict, dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from lens_compare.models.tokens import untrained_token_ids


@dataclass(frozen=True)
class ModelFacts:
    """One model's facts, as the provenance records them."""

    # sha256 (16 hex digits) of the input embedding and the last norm weight (lens_compare.models.loading).
    weights_sha256_16: str
    # The width of the residual stream (the input embedding's).
    d_model: int
    # How the model was loaded, in words (LoadOptions.describe(), and whether it was streamed).
    load: str
    # What the provenance records of an NF4 model (lens_compare.models.quantization); None: not quantized.
    quantization: dict[str, Any] | None
    # Device -> the decoder blocks placed there and their GiB (lens_compare.models.placement.summarize_placement).
    placement: dict[str, dict[str, Any]]
    # The base model's embedding rows that look untrained among the run's ids: id -> row norm / median.
    untrained: dict[int, float]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the untrained ids as strings."""
        return {**asdict(self), "untrained": {str(token): ratio for token, ratio in self.untrained.items()}}

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> "ModelFacts":
        return cls(**{**document, "untrained": {int(token): ratio for token, ratio in document["untrained"].items()}})


def model_facts(
    role: str,
    embedding: Float[Tensor, "vocab d_model"],
    token_ids: tuple[tuple[int, ...], ...],
    *,
    fingerprint: str,
    load: str,
    placement: dict[str, dict[str, Any]],
    quantization: dict[str, Any] | None = None,
    base_lacks: tuple[int, ...] = (),
) -> ModelFacts:
    """The facts of the model in ``role`` whose input embedding is ``embedding``; its untrained
    rows are looked for (the base model's only) among the run's ``token_ids``, and the ids its
    tokenizer lacks (``base_lacks``, fed with --tokenizer sft) are counted among them."""
    seen_ids = {token for ids in token_ids for token in ids}
    untrained = untrained_token_ids(embedding, seen_ids, known=frozenset(base_lacks)) if role == "base" else {}
    return ModelFacts(fingerprint, int(embedding.shape[1]), load, quantization, placement, untrained)
