"""Runs read back from disk, and several runs as one DataFrame.

>>> result = lens_compare.load_run("outputs/lens_compare_smollm2-sanity_20261127T085842Z.json")  # doctest: +SKIP
>>> result.summary(metric="cosine"); result.to_dataframe()                                   # doctest: +SKIP
>>> lens_compare.concat_runs([run_a, run_b, "outputs/other.json"])                           # doctest: +SKIP

``load_run`` reads the JSON a run wrote and, when they are beside it with the same stem,
its token table (``.tokens.parquet``, else ``.tokens.csv``), which restores the per-token
metrics exactly, and its residuals (``.safetensors``, from ``--save-residuals``).
"""

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from lens_compare.analyses import ANALYSES
from lens_compare.errors import LensCompareError
from lens_compare.metrics.aggregate import aggregated_positions
from lens_compare.metrics.bootstrap import Bootstrap
from lens_compare.metrics.residual import METRIC_NAMES
from lens_compare.metrics.states import ResidualStates
from lens_compare.models.tokens import TokenizedPrompts
from lens_compare.results.provenance import Provenance, floor_provenance
from lens_compare.results.result import SCHEMA_VERSION, ComparisonResult
from lens_compare.util.hooks import HOOK_KINDS, hook_name, states_for_layers

# Schema 1 runs (before the bootstrap intervals) read the same, without ci_low/ci_high;
# schema 1 and 2 runs have no analyses; schema 3 runs have a logit lens at every layer when any;
# runs before schema 5 have no difference lens, before schema 6 no steering check, before schema 7
# no difference-lens positions.
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6, SCHEMA_VERSION)


def _stem(path: Path) -> Path:
    return path.with_suffix("") if path.suffix == ".json" else path


def load_run(path: str | Path) -> ComparisonResult:
    """The result a run wrote to ``path`` (its ``.json``), with the files saved beside it."""
    given = Path(path)
    # The .json a run wrote, or its stem (``outputs/lens_compare_x_<UTC>``) without the suffix.
    path = given if given.is_file() or given.suffix == ".json" else given.with_name(given.name + ".json")
    if not path.is_file():
        raise LensCompareError(f"no run at {str(given)!r}: give the .json a run wrote")
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LensCompareError(f"{str(path)!r} is not a lens_compare run (not JSON: {error})") from None
    version = document.get("schema_version") if isinstance(document, dict) else None
    if version not in READABLE_VERSIONS:
        raise LensCompareError(f"{str(path)!r} has schema_version {version!r}; this lens_compare reads "
                               f"{', '.join(map(str, READABLE_VERSIONS))}")
    provenance = Provenance.from_dict(document["provenance"])
    layers = tuple(document["layers"])
    token_ids = tuple(tuple(ids) for ids in provenance.token_ids)
    prompts = tuple(provenance.prompts)
    content = provenance.token_content
    lacked = tuple(entry["id"] for entry in provenance.untrained_base_tokens or []
                   if not entry.get("in_base_tokenizer", True))
    tokens = TokenizedPrompts(prompts, tuple(provenance.texts or prompts), token_ids, provenance.chat_template,
                              None if content is None else tuple(tuple(bool(f) for f in row) for row in content),
                              tokenizer=provenance.tokenizer or "base", base_lacks=lacked)
    width = max(tokens.lengths)
    real = torch.zeros((len(token_ids), width), dtype=torch.bool)
    for row, ids in enumerate(token_ids):
        real[row, : len(ids)] = True
    include_first = document["aggregation"]["position_0"] == "included"
    main = aggregated_positions(include_first)
    untrained = {int(entry["id"]): float(entry["norm_over_median"]) for entry in provenance.untrained_base_tokens or []}
    table = _token_table(_stem(path))
    held = [a for a in ANALYSES if a.name in document]
    # Each analysis's layers, from its records: a logit lens may cover fewer layers than the run.
    analysis_layers = {a.name: tuple(record["layer"] for record in document[a.name]) for a in held}
    metrics, analysis_metrics, token_strings = (None, {}, tuple(("",) * len(ids) for ids in token_ids)) \
        if table is None else _metrics_from_table(table, layers, real, held, analysis_layers)
    stored = None if metrics is not None else {
        main: {k: document[k] for k in (*HOOK_KINDS, *(a.name for a in held))},
        "first": document["first_token"], **(document.get("token_classes") or {})}
    return ComparisonResult(
        provenance=provenance, layers=layers, tokens=tokens, token_strings=token_strings,
        untrained_base_tokens=untrained, real_tokens=real, metrics=metrics, include_first_token=include_first,
        residuals=_residuals(_stem(path).with_suffix(".safetensors"), layers, provenance.n_layers),
        stored_records=stored,
        bootstrap=_bootstrap(provenance),
        analysis_metrics=analysis_metrics,
        stored_top_tokens=document.get("top_tokens"),
        stored_warnings=document.get("warnings"),
        cka=document.get("cka"),
        noise_floor=_noise_floor(document, provenance, layers, tokens, real, include_first, main),
        analysis_layers=analysis_layers,
        difference_lens_records=document.get("difference_lens"),
        difference_positions_records=document.get("difference_positions"),
        steering_records=document.get("steering"),
    )


def _noise_floor(document, provenance, layers, tokens, real, include_first, main) -> ComparisonResult | None:
    """The run's own noise floor, from its JSON records (the floor's per-token values are not saved)."""
    floor = document.get("noise_floor")
    if floor is None:
        return None
    return ComparisonResult(
        provenance=floor_provenance(floor.get("model"), floor["dtype"], provenance.n_layers, provenance),
        layers=layers, tokens=tokens, token_strings=tuple(("",) * len(ids) for ids in tokens.token_ids),
        untrained_base_tokens={}, real_tokens=real, metrics=None, include_first_token=include_first,
        stored_records={main: {k: floor[k] for k in HOOK_KINDS}, "first": floor["first_token"]},
    )


def _bootstrap(provenance: Provenance) -> Bootstrap | None:
    """The interval settings the run used (schema 1 runs had none), so that recomputing the
    aggregates from the token table draws the same resamples."""
    settings = provenance.bootstrap
    return None if settings is None else Bootstrap(settings["resamples"], settings["seed"])


def _token_table(stem: Path) -> pd.DataFrame | None:
    for suffix in (".tokens.parquet", ".tokens.csv"):
        candidate = stem.with_name(stem.name + suffix)
        if candidate.is_file():
            if suffix.endswith("parquet"):
                return pd.read_parquet(candidate)
            return pd.read_csv(candidate, keep_default_na=False, na_values=[""], dtype={"token": str})
    return None


def _metrics_from_table(table: pd.DataFrame, layers: tuple[int, ...], real: torch.Tensor, analyses,
                        analysis_layers: dict[str, tuple[int, ...]]):
    """The residual metrics, the ``analyses``' per-token values (over ``analysis_layers``) and the token
    strings, from a token table."""
    table_layers = table["layer"].to_numpy()
    prompts = torch.tensor(table["prompt"].to_numpy())
    positions = torch.tensor(table["position"].to_numpy())
    values = torch.tensor(table["value"].to_numpy(dtype="float32"))

    def grid(hook: str, name: str, over: tuple[int, ...]) -> torch.Tensor:
        out = torch.full((len(over), *real.shape), torch.nan)
        row_of = np.full(max(over, default=0) + 1, -1)
        row_of[list(over)] = np.arange(len(over))
        pick = ((table["hook"] == hook) & (table["metric"] == name)).to_numpy()
        rows = torch.tensor(row_of[table_layers[pick]], dtype=torch.long)
        pick = torch.tensor(pick)
        out[rows, prompts[pick], positions[pick]] = values[pick]
        return out

    metrics = {hook: {name: grid(hook, name, layers) for name in METRIC_NAMES} for hook in HOOK_KINDS}
    analysis_metrics = {key: grid(*analysis.hook_and_metric(key), analysis_layers[analysis.name])
                        for analysis in analyses for key in analysis.keys}
    strings = [[""] * int(n) for n in real.sum(dim=1).tolist()]
    first = table.drop_duplicates(["prompt", "position"])
    for prompt, position, token in zip(first["prompt"], first["position"], first["token"], strict=True):
        strings[int(prompt)][int(position)] = "" if pd.isna(token) else str(token)
    return metrics, analysis_metrics, tuple(tuple(row) for row in strings)


def _residuals(path: Path, layers: tuple[int, ...], n_layers: int) -> tuple[ResidualStates, ResidualStates] | None:
    """Both models' states from a ``--save-residuals`` file (read whole: mind the size)."""
    if not path.is_file():
        return None
    states = states_for_layers(layers)
    out = []
    with safe_open(str(path), "pt") as handle:
        for role in ("base", "sft"):
            values = []
            for state in states:
                # Each state is stored under both of its hook names; read whichever was captured.
                kind, layer = ("resid_pre", state) if state in layers else ("resid_post", state - 1)
                values.append(handle.get_tensor(f"{role}/{hook_name(kind, layer)}"))
            out.append(ResidualStates(n_layers=n_layers, states=states, values=torch.stack(values)))
    return out[0], out[1]


def concat_runs(runs: list[ComparisonResult | str | Path], table: str = "summary") -> pd.DataFrame:
    """Several runs as one long DataFrame (``summary`` or ``tokens``), with a ``pair`` column and,
    where one pair appears more than once, a ``run`` column (its position in ``runs``)."""
    if table not in ("summary", "tokens"):
        raise LensCompareError(f"concat_runs(table={table!r}): expected 'summary' or 'tokens'")
    results = [run if isinstance(run, ComparisonResult) else load_run(run) for run in runs]
    if not results:
        raise LensCompareError("concat_runs needs at least one run")
    pairs = [str(result.provenance.pair) for result in results]
    repeated = len(set(pairs)) < len(pairs)
    frames = []
    for index, (result, pair) in enumerate(zip(results, pairs, strict=True)):
        frame = result.summary() if table == "summary" else result.to_dataframe()
        extra: dict[str, Any] = {"pair": pair}
        if repeated:
            extra["run"] = index
        frames.append(frame.assign(**extra))
    combined = pd.concat(frames, ignore_index=True)
    combined["pair"] = combined["pair"].astype("category")
    for column in ("hook", "metric", "positions", "token"):
        if column in combined and not isinstance(combined[column].dtype, pd.CategoricalDtype):
            combined[column] = combined[column].astype("category")
    leading = ["pair", *(["run"] if repeated else [])]
    return combined[leading + [c for c in combined.columns if c not in leading]]
