"""One model's captured residual states: what a capture fills and every metric reads."""

from dataclasses import dataclass

from jaxtyping import Float
from torch import Tensor

from lens_compare.errors import CaptureError
from lens_compare.util.hooks import COMPONENTS, Component, HookKind, state_index


@dataclass(frozen=True)
class ResidualStates:
    """One model's distinct residual states; ``resid_pre``/``resid_post`` are views.

    ``states[i]`` is the state index held in ``values[i]`` (state ``s`` is the input of
    block ``s``; state ``n_layers`` is the output of the last block). Padding
    positions hold zeros.

    ``components[i, c]`` is block ``component_layers[i]``'s write ``COMPONENTS[c]``
    (``attn_out``, ``mlp_out``) into the stream, when those were captured.
    """

    n_layers: int
    states: tuple[int, ...]
    values: Float[Tensor, "state prompt pos d_model"]
    component_layers: tuple[int, ...] = ()
    components: Float[Tensor, "layer component prompt pos d_model"] | None = None

    def component(self, component: Component, layer: int) -> Float[Tensor, "prompt pos d_model"]:
        if self.components is None or layer not in self.component_layers:
            raise CaptureError(f"{component} of layer {layer} was not captured (layers held: {self.component_layers})")
        return self.components[self.component_layers.index(layer), COMPONENTS.index(component)]

    def view(self, kind: HookKind, layer: int) -> Float[Tensor, "prompt pos d_model"]:
        state = state_index(kind, layer)
        if state not in self.states:
            raise CaptureError(f"{kind} of layer {layer} was not captured (states held: {self.states})")
        return self.values[self.states.index(state)]

    def resid_pre(self, layer: int) -> Float[Tensor, "prompt pos d_model"]:
        return self.view("resid_pre", layer)

    def resid_post(self, layer: int) -> Float[Tensor, "prompt pos d_model"]:
        return self.view("resid_post", layer)
