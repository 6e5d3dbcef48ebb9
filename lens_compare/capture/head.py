"""A model's head: its final norm and unembedding, read once for the logit lens.

Both engines take it from a model (``head_of`` from a loaded HF model; the stream engine from
the checkpoint's tensors) and the lens reads every lensed layer's stream through it.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor


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

    def detached(self) -> "Head":
        """A copy that holds nothing of its model: a sequential run keeps the first model's head
        while the second runs, and a view of the first model's weights would keep every page of
        its memory-mapped checkpoint resident with it (safetensors load as views of the file)."""
        import copy

        return Head(copy.deepcopy(self.norm), self.weight.clone(), None if self.bias is None else self.bias.clone())

    def shared(self, vocab: int) -> "Head":
        """This head over the first ``vocab`` token ids only (two vocabularies that differ in size
        compare the ids they share): views of the same weights, not copies."""
        if vocab == self.vocab:
            return self
        return Head(self.norm, self.weight[:vocab], None if self.bias is None else self.bias[:vocab])

    def logits(self, resid: Float[Tensor, "token d_model"],
               out: Float[Tensor, "token vocab"] | None = None) -> Float[Tensor, "token vocab"]:
        """The model's own next-token logits for a residual stream, in the head's dtype (a 16-bit
        run's product stays 16-bit; the lens upcasts small slices of it). ``out``: a buffer of
        ``[token, vocab]`` to write into (reused from chunk to chunk: a fresh buffer of hundreds of
        MiB would be faulted in page by page every time)."""
        with torch.inference_mode():
            normed = self.norm(resid.to(self.device, self.weight.dtype)).to(self.weight.dtype)
            if out is None:
                return torch.nn.functional.linear(normed, self.weight, self.bias)
            if self.bias is None:
                return torch.mm(normed, self.weight.t(), out=out)
            return torch.addmm(self.bias, normed, self.weight.t(), out=out)


def head_of(hf_model, final_norm: str) -> Head:
    """The head of a loaded HF causal LM: its final norm module (``final_norm``, a path in its base
    model) and its output embedding's weight, shared with the model, not copied (a sequential run
    keeps them, and only them, alive after the model is released). Taken before TransformerBridge
    wraps the modules; the bridge leaves the HF modules and their weights as they are."""
    norm = hf_model.base_model.get_submodule(final_norm).eval()
    output = hf_model.get_output_embeddings()
    return Head(norm, output.weight.detach(), None if output.bias is None else output.bias.detach())
