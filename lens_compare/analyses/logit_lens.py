"""Logit lens between the models: what each layer's stream would predict, base vs SFT.

At every captured layer the residual stream after the block (``resid_post``) goes through
each model's own final norm and unembedding, giving two next-token distributions per
token, p_base and p_sft. Per token (natural log throughout):

- ``kl_sft_base`` = KL(p_sft || p_base) = sum p_sft (log p_sft - log p_base);
- ``js``: the Jensen-Shannon divergence 0.5 KL(p_sft || m) + 0.5 KL(p_base || m), m the mean;
- ``top1_agree``: 1 where both distributions' argmax is the same token, else 0;
- ``base_kl_to_final``, ``sft_kl_to_final``: KL(p_final || p_layer) of each model with
  its own final-layer distribution (0 at the last layer), the usual logit-lens
  convergence measure.

At the last layer the lens is the models' actual output, so ``kl_sft_base`` there is the
KL between the two models' real next-token distributions.

Memory: ``[tokens, vocab]`` tensors never pile up. The real tokens are taken in chunks
(``chunk_tokens``: as many as keep about ``CHUNK_BYTES`` of float32 ``[tokens, vocab]``
working tensors), and for each chunk every layer in turn: a 128k vocabulary at
``CHUNK_BYTES`` = 256 MiB takes ~70 tokens per chunk. The unembedding runs in the model's
dtype (as the model's own head does), everything after it in float32.
"""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import einops
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from lens_compare.errors import ConfigError
from lens_compare.hardware.families import final_norm_path
from lens_compare.hardware.units import LOGIT_LENS_CHUNK_BYTES

logger = logging.getLogger("lens_compare")

LOGIT_LENS_KEYS = ("kl_sft_base", "js", "top1_agree", "base_kl_to_final", "sft_kl_to_final")
# Float32 [tokens, vocab] working tensors a chunk holds at once: both final log-probs, both
# layer log-probs and the temporaries of the divergences.
WORKING_TENSORS = 7
CHUNK_BYTES = LOGIT_LENS_CHUNK_BYTES
# Config fields that change logits after the unembedding; a model using one is refused.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class Head:
    """One model's final norm and unembedding, detached from the rest of the model."""

    norm: torch.nn.Module
    weight: Float[Tensor, "vocab d_model"]
    bias: Float[Tensor, " vocab"] | None

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def vocab(self) -> int:
        return int(self.weight.shape[0])

    def logits(self, resid: Float[Tensor, "token d_model"]) -> Float[Tensor, "token vocab"]:
        """The model's own next-token logits for a residual stream, in float32."""
        with torch.no_grad():
            normed = self.norm(resid.to(self.device, self.weight.dtype))
            out = torch.nn.functional.linear(normed.to(self.weight.dtype), self.weight, self.bias)
        return out.float()


def head_of(hf_model, final_norm: str) -> Head:
    """The head of a loaded HF causal LM: its final norm module (``final_norm``, a path in its base
    model) and its output embedding's weight, shared with the model, not copied (a sequential run
    keeps them, and only them, alive after the model is released). Taken before TransformerBridge
    wraps the modules; the bridge leaves the HF modules and their weights as they are."""
    norm = hf_model.base_model.get_submodule(final_norm).eval()
    output = hf_model.get_output_embeddings()
    return Head(norm, output.weight.detach(), None if output.bias is None else output.bias.detach())


def check_logits_are_plain(config, label: str) -> None:
    """Refuse, before any weight is read, a model whose logits are scaled or capped after the
    unembedding: the lens would not reproduce its output."""
    for field in LOGIT_TRANSFORMS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise ConfigError(
                f"{label}: config.{field} = {getattr(config, field)!r} transforms the logits after the "
                "unembedding, which the logit lens does not reproduce; run with --no-logit-lens"
            )


# On by default up to this many parameters per model ("up to 8B"; Llama-3.1-8B has 8.03B).
DEFAULT_MAX_PARAMS = 8.5e9


def resolve_logit_lens(requested: bool | None, configs: dict[str, object]) -> bool:
    """Whether a run computes the logit lens: ``requested`` (True/False), or by default (None)
    when both models have a known final norm, plain logits and at most ``DEFAULT_MAX_PARAMS``
    parameters. Refuses, before any weight is read, a requested lens it cannot compute."""
    if requested is False:
        return False
    for role, config in configs.items():
        model_type = getattr(config, "model_type", None)
        if final_norm_path(model_type) is None:
            reason = (f"the {role} model's model_type {model_type!r} has no known final norm (add final_norm to "
                      "its StreamRule in lens_compare/hardware/families.py)")
            if requested:
                raise ConfigError(f"--logit-lens: {reason}; run with --no-logit-lens")
            logger.info("logit lens off: %s", reason)
            return False
        try:
            check_logits_are_plain(config, f"{role} model")
        except ConfigError as error:
            if requested:
                raise
            logger.info("logit lens off: %s", error)
            return False
    if requested:
        return True
    from lens_compare.hardware.architecture import architecture_from_config
    from lens_compare.hardware.params import count_params

    largest = max(count_params(architecture_from_config(config)).total for config in configs.values())
    if largest > DEFAULT_MAX_PARAMS:
        logger.info("logit lens off by default for models above 8B parameters (this pair: %.1fB); "
                    "--logit-lens turns it on", largest / 1e9)
        return False
    return True


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk so that the float32 working tensors stay within ``budget`` bytes."""
    return max(1, budget // (WORKING_TENSORS * vocab * 4))


def _dot(a: Float[Tensor, "token vocab"], b: Float[Tensor, "token vocab"]) -> Float[Tensor, " token"]:
    """Per-token sum over the vocabulary of a * b (a batched matrix product: no [token, vocab] temporary)."""
    return einops.einsum(a, b, "token vocab, token vocab -> token")


def token_divergences(
    base_logp: Float[Tensor, "token vocab"], sft_logp: Float[Tensor, "token vocab"],
    base_final: Float[Tensor, "token vocab"], sft_final: Float[Tensor, "token vocab"],
    final_probs: tuple[Float[Tensor, "token vocab"], Float[Tensor, "token vocab"]] | None = None,
) -> dict[str, Float[Tensor, " token"]]:
    """Every logit-lens value of a chunk of tokens, from float32 log-probabilities.

    ``final_probs``: ``exp`` of ``base_final`` and ``sft_final`` when the caller has them (they
    are the same for every layer of a chunk). Each divergence sums p * (log p - log q) term by
    term, so two close distributions give a small, accurate value (not a difference of two
    entropies)."""
    sft_p, base_p = sft_logp.exp(), base_logp.exp()
    base_final_p, sft_final_p = final_probs if final_probs is not None else (base_final.exp(), sft_final.exp())
    log_mean = torch.logaddexp(sft_logp, base_logp) - math.log(2.0)
    values = {
        "kl_sft_base": _dot(sft_p, sft_logp - base_logp),
        "js": 0.5 * (_dot(sft_p, sft_logp - log_mean) + _dot(base_p, base_logp - log_mean)),
        "top1_agree": (base_logp.argmax(dim=-1) == sft_logp.argmax(dim=-1)).float(),
        "base_kl_to_final": _dot(base_final_p, base_final - base_logp),
        "sft_kl_to_final": _dot(sft_final_p, sft_final - sft_logp),
    }
    # Rounding can leave a divergence of identical distributions at -1e-8: a divergence is >= 0.
    return {key: value if key == "top1_agree" else value.clamp_min(0) for key, value in values.items()}


def logit_lens_metrics(
    heads: dict[str, Head],
    read_state: Callable[[str, int], Float[Tensor, "prompt pos d_model"]],
    layers: tuple[int, ...],
    final_state: int,
    real: Bool[Tensor, "prompt pos"],
    *,
    budget: int = CHUNK_BYTES,
    states_in_memory: bool = True,
) -> dict[str, Float[Tensor, "layer prompt pos"]]:
    """``LOGIT_LENS_KEYS`` -> [layer, prompt, pos] (NaN at padding) for the ``resid_post`` of
    ``layers`` (state l + 1); ``read_state(role, state)`` gives a model's state.

    ``states_in_memory``: chunks outside, layers inside, so each chunk's final distributions
    are computed once (``read_state`` is called per chunk, so it must be cheap). Otherwise
    (states on disk, the streamed run) layers outside: each state is read once and the final
    distributions are recomputed for every layer. Both give the same numbers."""
    rows, columns = real.nonzero(as_tuple=True)
    n_tokens = int(rows.numel())
    step = chunk_tokens(max(head.vocab for head in heads.values()), budget)
    chunks = [(start, min(start + step, n_tokens)) for start in range(0, n_tokens, step)]
    finals = {role: read_state(role, final_state)[rows, columns] for role in heads}
    out = {key: torch.full((len(layers), n_tokens), torch.nan) for key in LOGIT_LENS_KEYS}

    def log_probs(role: str, resid: Tensor) -> Tensor:
        return torch.log_softmax(heads[role].logits(resid), dim=-1)

    def finals_of(start: int, stop: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Both models' final log-probabilities of a chunk, and their exp."""
        logp = {role: log_probs(role, finals[role][start:stop]) for role in heads}
        return logp, {role: value.exp() for role, value in logp.items()}

    def compare(row: int, start: int, stop: int, final: tuple[dict[str, Tensor], dict[str, Tensor]],
                resid: dict[str, Tensor]) -> None:
        final_logp, final_p = final
        layer_logp = {role: final_logp[role] if layers[row] + 1 == final_state else log_probs(role, resid[role])
                      for role in heads}
        values = token_divergences(layer_logp["base"], layer_logp["sft"], final_logp["base"], final_logp["sft"],
                                   (final_p["base"], final_p["sft"]))
        for key, value in values.items():
            out[key][row, start:stop] = value.cpu()

    if states_in_memory:
        for start, stop in chunks:
            final = finals_of(start, stop)
            for row, layer in enumerate(layers):
                resid = {role: read_state(role, layer + 1)[rows[start:stop], columns[start:stop]] for role in heads}
                compare(row, start, stop, final, resid)
    else:
        for row, layer in enumerate(layers):
            state = {role: read_state(role, layer + 1)[rows, columns] for role in heads}
            for start, stop in chunks:
                compare(row, start, stop, finals_of(start, stop), {role: state[role][start:stop] for role in heads})
    grids = {}
    for key, flat in out.items():
        grid = torch.full((len(layers), *real.shape), torch.nan)
        grid[:, rows, columns] = flat
        grids[key] = grid
    return grids
