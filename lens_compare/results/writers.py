"""Writing a run's outputs: its JSON, its tables, and its residuals file."""

from pathlib import Path

from lens_compare.config import RunConfig
from lens_compare.engines.job import Job
from lens_compare.engines.store import Kind, Store
from lens_compare.results.residual_file import write_residual_file
from lens_compare.results.result import ComparisonResult
from lens_compare.util.dtypes import TORCH_DTYPES
from lens_compare.util.outputs import write_frame, write_json


def write_outputs(result: ComparisonResult, config: RunConfig, stem: Path, job: Job, store: Store) -> list[Path]:
    """The run's JSON at ``stem``.json, its tables in each ``config.export`` format, and with
    ``config.save_residuals`` its states as ``stem``.safetensors, read from ``store``. Returns
    the paths written (each atomically)."""
    written = [write_json(stem.with_suffix(".json"), result.to_dict())]
    if config.export:
        tables = {"tokens": result.to_dataframe(), "summary": result.summary()}
        for fmt in config.export:
            for name, frame in tables.items():
                written.append(write_frame(stem.with_name(f"{stem.name}.{name}.{fmt}"), frame, fmt))
    if config.save_residuals:
        written.append(write_residual_file(
            stem.with_suffix(".safetensors"),
            token_ids=job.token_ids.masked_fill(~job.real, 0), real=job.real, layers=result.layers,
            dtypes={side.role: TORCH_DTYPES[side.dtype] for side in job.sides},
            d_model=result.provenance.d_model, bounds=job.layout.bounds,
            state_slice=lambda role, state, shard: store.get(Kind.STATE, role=role, shard=shard, state=state),
            metadata={"pair": str(result.provenance.pair), "layers": ",".join(map(str, result.layers))},
        ))
    return written
