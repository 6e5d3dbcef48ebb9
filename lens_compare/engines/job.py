"""One comparison's work as the engines see it (``Job``), and the logit lens's progress bar."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jaxtyping import Bool, Int
from torch import Tensor

from lens_compare.analyses.difference_lens import DifferenceLens
from lens_compare.analyses.steering import Steering
from lens_compare.engines.shards import ShardLayout
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.refs import Side
from lens_compare.util.units import LOGIT_LENS_CHUNK_BYTES

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class Job:
    """One comparison's work, as the engines see it."""

    # The two models as they load (base, sft), their transformers configs and tokenizers by role.
    sides: tuple[Side, Side]
    model_configs: dict[str, "PretrainedConfig"]
    tokenizers: dict[str, Any]
    # Each prompt's token ids, unpadded (what the untrained-embedding check reads).
    prompt_ids: tuple[tuple[int, ...], ...]
    # The run's device (cpu, cuda:N) and prompts per forward pass.
    device: str
    batch_size: int
    loads: dict[str, LoadOptions]
    layout: ShardLayout
    states: tuple[int, ...]
    keep_states: bool
    token_ids: Int[Tensor, "prompt pos"]
    real: Bool[Tensor, "prompt pos"]
    # Blocks whose attention and MLP outputs are compared (the components analysis); () for none.
    component_layers: tuple[int, ...] = ()
    # The layers whose resid_post the logit lens reads (``states`` include each one's, and the last,
    # ``n_layers``); () for no lens.
    lens_layers: tuple[int, ...] = ()
    # Bytes of the lens's working tensors per chunk of tokens (sized from what the plan leaves free).
    lens_chunk_bytes: int = LOGIT_LENS_CHUNK_BYTES
    # The ids the lens compares when the two vocabularies differ in size (None: every id).
    lens_vocab: int | None = None
    # The difference lens (its layers, token classes and their masks over ``real``); None for none.
    # It reads through the logit lens's heads, so it runs only beside the lens.
    difference: DifferenceLens | None = None
    # The steering check (its layers and multiples of δ); None for none. It needs the difference lens.
    steering: Steering | None = None
    # The steering check's held-out prompts (``--steer-prompts``), padded as ``token_ids`` and ``real``
    # are; None for none. They are the steering check's last unit (``steering_units``).
    held_out_ids: Int[Tensor, "held_out held_out_pos"] | None = None
    held_out_real: Bool[Tensor, "held_out held_out_pos"] | None = None
    # Measure the noise floor after the run (``lens_compare.engines.noise_floor``; needs keep_states).
    noise_floor: bool = False
    # The shards this call runs (None: every one); an engine skips those the store holds already.
    shards: tuple[int, ...] | None = None
    # Ids fed that the base tokenizer lacks (--tokenizer sft): the untrained-embedding check counts
    # them whatever their row's norm.
    base_lacks: tuple[int, ...] = ()

    @property
    def logit_lens(self) -> bool:
        return bool(self.lens_layers)

    def selected_shards(self) -> tuple[int, ...]:
        return tuple(range(self.layout.count)) if self.shards is None else self.shards

    def shard_inputs(self, shard: int) -> tuple[Int[Tensor, "prompt pos"], Bool[Tensor, "prompt pos"]]:
        """A shard's ids and mask, trimmed to the shard's longest prompt."""
        start, stop = self.layout.bounds[shard]
        real = self.real[start:stop]
        width = int(real.sum(dim=1).max())
        return self.token_ids[start:stop, :width], real[:, :width]

    def steering_units(self) -> tuple[int, ...]:
        """The steering check's units: each shard of the run, then (``held_out``) one of the held-out
        prompts, numbered ``layout.count``; none without the check."""
        if self.steering is None:
            return ()
        return tuple(range(self.layout.count + (self.held_out_ids is not None)))

    def held_out(self, unit: int) -> bool:
        """Whether steering unit ``unit`` is the held-out prompts (else a shard of the run's)."""
        return unit == self.layout.count

    def steering_inputs(self, unit: int) -> tuple[Int[Tensor, "prompt pos"], Bool[Tensor, "prompt pos"]]:
        """A steering unit's ids and mask (``steering_units``), trimmed to its longest prompt."""
        if not self.held_out(unit):
            return self.shard_inputs(unit)
        width = int(self.held_out_real.sum(dim=1).max())
        return self.held_out_ids[:, :width], self.held_out_real[:, :width]

    def shard_prompts(self, shard: int) -> int:
        start, stop = self.layout.bounds[shard]
        return stop - start


@contextmanager
def lens_progress(job: Job, shard: int) -> Iterator[Callable[[], None] | None]:
    """A bar over the logit lens's layers of a shard when it reads more than one (its ``on_layer``), or None."""
    if len(job.lens_layers) < 2:
        yield None
        return
    from lens_compare.util.progress import progress_bar

    desc = "logit lens" + (f" shard {shard + 1}/{job.layout.count}" if job.layout.count > 1 else "")
    with progress_bar(total=len(job.lens_layers), desc=desc, unit="layer", dynamic_ncols=True, leave=False) as bar:
        yield lambda: bar.update(1)
