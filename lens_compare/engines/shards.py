"""How a prompt set is cut into shards: consecutive prompts, finished and stored one shard at a time.

A shard is the unit of progress: its per-token metrics are written as soon as both
models have run it, so an interrupted run loses at most the shard in progress. By
default a shard holds as many prompts as keep both models' residual states of the
shard under ``SHARD_BUDGET_BYTES`` of host RAM, rounded down to whole forward
batches, so a run's memory does not grow with the number of prompts.

>>> layout = ShardLayout(n_prompts=10, size=4)
>>> layout.bounds
((0, 4), (4, 8), (8, 10))
"""

from dataclasses import dataclass

from lens_compare.errors import ConfigError

SHARD_BUDGET_BYTES = 2 * 2**30


@dataclass(frozen=True)
class ShardLayout:
    n_prompts: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ConfigError(f"shard size must be >= 1 prompt, got {self.size}")

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        return tuple(
            (start, min(start + self.size, self.n_prompts)) for start in range(0, self.n_prompts, self.size)
        )

    @property
    def count(self) -> int:
        return len(self.bounds)


def state_bytes_per_prompt(n_states: int, max_tokens: int, d_model: int, activation_bytes: tuple[int, ...]) -> int:
    """Host bytes one prompt's residual states take, summed over the models in ``activation_bytes``."""
    return sum(n_states * max_tokens * d_model * width for width in activation_bytes)


def default_shard_size(per_prompt_bytes: int, batch_size: int, budget: int = SHARD_BUDGET_BYTES) -> int:
    """Prompts per shard so that a shard's states stay within ``budget`` (at least one prompt)."""
    fit = max(1, budget // max(per_prompt_bytes, 1))
    return fit - fit % batch_size if fit >= batch_size else fit
