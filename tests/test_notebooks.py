"""Every notebook in notebooks/ runs top to bottom (outputs are stripped in git)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


# The notebooks that read the fine-tuned demo pair run on the test worker that trains it (once, into
# the shared cache), not on the other worker waiting for it. Each is a test function of its own:
# pytest-xdist 3.8 does not group parametrized tests by xdist_group (their node ids put the
# group before the parameters), so a parametrized test would land on either worker.
FINE_TUNED = ("01_quickstart.ipynb", "03_reading_results.ipynb")
NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_ft")
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    run_notebook(NOTEBOOKS_DIR / "01_quickstart.ipynb", tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2_ft")
def test_reading_results_notebook_runs(tmp_path, monkeypatch):
    run_notebook(NOTEBOOKS_DIR / "03_reading_results.ipynb", tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("path", [path for path in NOTEBOOKS if path.name not in FINE_TUNED], ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    run_notebook(path, tmp_path, monkeypatch)


def run_notebook(path: Path, tmp_path: Path, monkeypatch) -> None:
    """Run ``path`` top to bottom; no cell errs, none shows a wall of bars or a figure twice."""
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{path.name} has outputs committed; clear them before committing"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    for cell in notebook.cells:
        outputs = cell.get("outputs", [])
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        # No wall of bars: lens_compare's one bar per run, none of transformers' loading bars.
        assert "IProgress" not in text and "Loading weights" not in text and "it/s]" not in text, cell.source
        widgets = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
        assert len(widgets) <= cell.source.count("compare(") + cell.source.count("demo_checkpoint("), cell.source
        # A figure is shown once, as the cell's value (lens_compare's figures are not pyplot's).
        images = [o for o in outputs if "image/png" in o.get("data", {})]
        assert len(images) == (1 if cell.source.startswith("plots.") else len(images)) and len(images) <= 1, \
            cell.source


def test_there_is_a_notebook():
    assert NOTEBOOKS, "notebooks/ holds no notebook"
    assert all((NOTEBOOKS_DIR / name).is_file() for name in FINE_TUNED)
