"""The notebooks of notebooks/ run top to bottom (at the tiny settings they are written with) and are committed
without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_three_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["hydra_sweep.ipynb", "quickstart.ipynb", "subclassing.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: clear the outputs"


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    # the kernel inherits the environment: one thread per process, as the other subprocess tests of the suite
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    # the notebooks make their run folders with tempfile.mkdtemp: keep them inside the test's own folder, which
    # pytest deletes, instead of leaving a few hundred MB in the system temp folder on every run of the suite
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    notebook = nbformat.read(path, as_version=4)
    resources = {"metadata": {"path": str(tmp_path)}}  # the working directory of the kernel
    client = NotebookClient(notebook, timeout=150, kernel_name="python3", resources=resources)
    client.execute()  # raises CellExecutionError naming the cell on the first error
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    made = [p for p in tmp_path.iterdir() if p.name.startswith("moco-")]
    uses_tempfile = "tempfile.mkdtemp" in path.read_text()
    assert bool(made) == uses_tempfile, f"{path.name} wrote its run folder outside TMPDIR"
