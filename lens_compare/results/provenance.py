"""The provenance of a noise floor read as a result of its own (in a run, or from a saved run's JSON)."""


def floor_provenance(model: str | None, dtypes: dict[str, str], n_layers: int, run: dict | None = None) -> dict:
    """The provenance of a noise floor as a result of its own: the SFT model ``model`` in its run
    precision (``dtypes["base"]``, the floor's "base" side) against itself in the second one
    (``dtypes["sft"]``); ``run``, the run's own provenance, lends the strategy and device."""
    run = run or {}
    side = {"reference": model, "kind": "noise floor"}
    return {
        "kind": "noise_floor",
        "pair": f"sft {dtypes['base']} vs {dtypes['sft']}",
        "model": model,
        "base_model": {**side, "dtype": dtypes["base"]},
        "sft_model": {**side, "dtype": dtypes["sft"]},
        "dtype": dict(dtypes),
        "n_layers": n_layers,
        "strategy": run.get("strategy"),
        "device": run.get("device"),
    }
