"""Where the logit lens runs: the ``logit_lens`` option, resolved before any weight is read.

The option (``--logit-lens MODE``, ``compare(logit_lens=...)``, ``logit_lens:`` in a config):

- ``auto`` (the default): every captured layer when the hardware planner estimates that the lens
  there costs at most ``AUTO_SHARE`` of the two models' forward passes on the run's device, else
  ``final``. The lens's cost is two unembeddings per layer and token: for any real model that is
  more than the forwards themselves (Llama-3.1-8B: 67 GFLOP per token at every layer against 32 for
  both forwards; SmolLM2: six times the forwards), so ``auto`` nearly always gives ``final``;
- ``all`` (``--logit-lens`` alone; ``true`` in a config): every captured layer;
- ``final``: the last layer only, which is each model's actual output: the KL, JS and top-1
  agreement of the two models' real next-token distributions, at the cost of one unembedding
  per model and token;
- a list of layers, ``0,8,16,last`` (``[0, 8, 16, "last"]`` in a config);
- ``off`` (``--no-logit-lens``; ``false`` in a config).

The lens needs both models' final norm (known per family, ``StreamRule.final_norm``) and plain
logits (no soft-capping or scaling after the unembedding). When the two vocabularies differ in size
(an SFT recipe that added chat tokens and resized the embedding), the lens compares the ids they
share, each distribution renormalised over them, provided the shared ids are the same tokens in
both tokenizers; a run whose shared ids name different tokens is refused before loading, naming
the first one that differs.
"""

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from lens_compare.config import parse_lens_spec
from lens_compare.errors import ConfigError

logger = logging.getLogger("lens_compare")

# ``auto`` lenses every layer when that costs at most this share of the two forward passes.
AUTO_SHARE = 0.25
# Config fields that change logits after the unembedding; a model using one cannot be lensed.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class LensChoice:
    """What the lens does in this run: ``mode`` is ``all``, ``final``, ``layers`` or ``off``; ``layers``
    the layers whose ``resid_post`` it reads (empty when off); ``requested`` the option as given;
    ``reason`` one line on why; ``vocabulary`` the ids compared when the two vocabularies differ;
    ``estimate`` the planner's seconds behind an ``auto`` choice."""

    requested: str
    mode: str
    layers: tuple[int, ...]
    reason: str
    vocabulary: dict[str, Any] | None = None
    estimate: dict[str, float] | None = field(default=None)

    @property
    def on(self) -> bool:
        return bool(self.layers)

    @property
    def shared_vocab(self) -> int | None:
        """The ids the lens compares (the first ``shared_vocab`` of each head), when the sizes differ."""
        return None if self.vocabulary is None else self.vocabulary["shared"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}


OFF = LensChoice("off", "off", (), "--no-logit-lens")


def choose_logit_lens(spec: str, configs: dict[str, Any], tokenizers: dict[str, Any], captured: tuple[int, ...],
                      estimate=None) -> LensChoice:
    """The lens for a run of two models (``configs``, ``tokenizers`` by role) capturing ``captured``.

    ``estimate()``, called for ``auto`` only, gives the planner's ``{"forwards": s, "lens_all": s}``
    on the run's device (None: no estimate for these models). Refuses, before any weight is read,
    a lens it cannot compute when asked for one; ``auto`` then turns it off and says why."""
    spec = parse_lens_spec(spec)
    if spec == "off":
        return OFF
    n_layers = int(configs["base"].num_hidden_layers)
    problem = _unsupported(configs)
    if problem:
        if spec != "auto":
            raise ConfigError(f"--logit-lens {spec}: {problem}; run with --no-logit-lens")
        logger.info("logit lens off: %s", problem)
        return LensChoice(spec, "off", (), problem)
    vocabulary = shared_vocabulary(configs, tokenizers)
    last = n_layers - 1
    if spec == "all":
        choice = LensChoice(spec, "all", tuple(captured), "asked for at every captured layer")
    elif spec == "final":
        choice = LensChoice(spec, "final", (last,), "asked for at the output only")
    elif spec == "auto":
        choice = _auto(captured, last, estimate() if estimate is not None else None)
    else:
        layers = sorted({last if item == "last" else int(item) for item in spec.split(",")})
        beyond = [layer for layer in layers if layer > last]
        if beyond:
            raise ConfigError(f"--logit-lens {spec}: layer {beyond[0]} does not exist: the models have {n_layers} "
                              f"layers (0..{last})")
        choice = LensChoice(spec, "final" if layers == [last] else "layers", tuple(layers),
                            f"asked for at layers {', '.join(map(str, layers))}")
    return LensChoice(choice.requested, choice.mode, choice.layers, choice.reason, vocabulary, choice.estimate)


def _auto(captured: tuple[int, ...], last: int, estimate: dict[str, float] | None) -> LensChoice:
    if estimate is None:
        return LensChoice("auto", "final", (last,), "no time estimate for these models: the output only "
                          "(--logit-lens all for every layer)")
    share = estimate["lens_all"] / max(estimate["forwards"], 1e-12)
    if share <= AUTO_SHARE:
        return LensChoice("auto", "all", tuple(captured),
                          f"every layer takes ~{estimate['lens_all']:.1f} s, {share:.0%} of the two forward passes' "
                          f"~{estimate['forwards']:.1f} s (at most {AUTO_SHARE:.0%})", None, estimate)
    return LensChoice("auto", "final", (last,),
                      f"every layer would take ~{estimate['lens_all']:.1f} s, {share:.1f}x the two forward passes' "
                      f"~{estimate['forwards']:.1f} s; --logit-lens all would add "
                      f"~{estimate['lens_all'] - estimate['lens_final']:.1f} s", None, estimate)


def _unsupported(configs: dict[str, Any]) -> str | None:
    """Why the lens cannot run on these models (None: it can)."""
    from lens_compare.models.families import final_norm_path

    for role, config in configs.items():
        model_type = getattr(config, "model_type", None)
        if final_norm_path(model_type) is None:
            return (f"the {role} model's model_type {model_type!r} has no known final norm (add final_norm to its "
                    "StreamRule in lens_compare/models/families.py)")
        for name in LOGIT_TRANSFORMS:
            if getattr(config, name, None) not in (None, 1, 1.0):
                return (f"{role} model: config.{name} = {getattr(config, name)!r} transforms the logits after the "
                        "unembedding, which the logit lens does not reproduce")
    return None


def shared_vocabulary(configs: dict[str, Any], tokenizers: dict[str, Any]) -> dict[str, Any] | None:
    """The ids both models' heads have, when their sizes differ (None when they agree), checked to be
    the same tokens in both tokenizers. A difference within those ids refuses the run, naming it."""
    sizes = {role: int(config.vocab_size) for role, config in configs.items()}
    shared = min(sizes.values())
    named = min([shared, *(len(tokenizer) for tokenizer in tokenizers.values())])
    ids = list(range(named))
    base, sft = (tokenizers[role].convert_ids_to_tokens(ids) for role in ("base", "sft"))
    if base != sft:
        first = next(i for i, (a, b) in enumerate(zip(base, sft, strict=False)) if a != b)
        raise ConfigError(
            f"the logit lens compares the two models' predictions token id by token id, but id {first} is "
            f"{base[first]!r} in the base tokenizer and {sft[first]!r} in the SFT tokenizer; run with "
            "--no-logit-lens (the residual metrics need only the prompts' ids, which agree)"
        )
    if len(set(sizes.values())) == 1:
        return None
    extra = {role: size - shared for role, size in sizes.items() if size > shared}
    return {"shared": shared, "sizes": sizes,
            "note": f"the lens compares the {shared:,} token ids both models have ("
                    + ", ".join(f"the {role} model has {n:,} more" for role, n in extra.items())
                    + "); each distribution is renormalised over them"}
