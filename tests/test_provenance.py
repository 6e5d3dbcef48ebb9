"""The provenance record: typed fields for the code, the JSON's mapping for notebooks, old runs read back."""

import json

from lens_compare.results.provenance import FLOOR_KEYS, RUN_KEYS, Provenance, floor_provenance

RUN = {key: None for key in RUN_KEYS} | {
    "pair": "smollm2-ft", "n_layers": 30, "dtype": {"base": "float32", "sft": "float32"},
    "base_model": {"reference": "pkg:a.gguf"}, "sft_model": {"reference": "demo:smollm2-ft"}, "device": "cpu",
    "strategy": "sequential", "config": {"top_tokens": 5}, "gpus": [], "token_ids": [[1, 2, 3]],
}


def test_a_run_reads_back_to_the_same_json_in_the_same_key_order():
    provenance = Provenance.from_dict(RUN)
    assert provenance.to_dict() == RUN and list(provenance.to_dict()) == list(RUN_KEYS)
    assert json.loads(json.dumps(provenance.to_dict())) == RUN
    assert (provenance.pair, provenance.n_layers, provenance.config["top_tokens"]) == ("smollm2-ft", 30, 5)
    assert provenance["pair"] == "smollm2-ft" and dict(provenance) == RUN and not provenance.is_noise_floor


def test_an_older_run_lacks_keys_and_a_newer_one_adds_some():
    old = {k: v for k, v in RUN.items() if k not in ("logit_lens", "plan", "bootstrap")}
    assert Provenance.from_dict(old).bootstrap is None
    newer = Provenance.from_dict({**RUN, "sweep": {"id": 3}})
    assert newer.extra == {"sweep": {"id": 3}} and newer.to_dict()["sweep"] == {"id": 3}


def test_a_noise_floor_writes_its_own_keys():
    floor = floor_provenance("demo:smollm2-ft", {"base": "float32", "sft": "bfloat16"}, 30, Provenance.from_dict(RUN))
    assert list(floor.to_dict()) == list(FLOOR_KEYS) and floor.is_noise_floor
    assert (floor.pair, floor.strategy, floor.device) == ("sft float32 vs bfloat16", "sequential", "cpu")
    assert Provenance.from_dict(floor.to_dict()) == floor
