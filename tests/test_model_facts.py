"""Model facts: one builder for every engine, and the JSON round trip a run folder makes."""

import json

import torch

from lens_compare.models.facts import ModelFacts, model_facts


def test_the_base_models_untrained_rows_survive_the_json_round_trip():
    embedding = torch.ones(6, 4)
    embedding[3] = 0.03125  # an untrained-looking row, among the run's ids
    embedding[5] = 0.03125  # one the run never uses
    token_ids = ((1, 3), (3, 2))
    placement = {"cpu": {"blocks": [0, 1], "gib": 0.0}}
    base = model_facts("base", embedding, token_ids, fingerprint="0" * 16, load="float32 on cpu",
                       placement=placement)
    assert base.d_model == 4 and base.quantization is None
    assert base.untrained == {3: 0.03125}
    assert model_facts("sft", embedding, token_ids, fingerprint="0" * 16, load="", placement=placement).untrained == {}

    document = json.loads(json.dumps(base.to_dict()))
    assert document["untrained"] == {"3": 0.03125}
    assert ModelFacts.from_dict(document) == base
