"""The notebooks under notebooks/: committed without outputs, and running end to end at a tiny size."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600


def test_notebooks_exist():
    assert {path.name for path in NOTEBOOKS} >= {"lora_finetuning.ipynb", "prompt_tuning_example.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_runs_end_to_end(path, prepared_smollm2, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("DELTATUNE_MODEL", str(prepared_smollm2))
    monkeypatch.setenv("DELTATUNE_NOTEBOOK_STEPS", "2")
    monkeypatch.setenv("DELTATUNE_NOTEBOOK_BATCH_SIZE", "2")
    monkeypatch.setenv("DELTATUNE_NOTEBOOK_EVAL_ROWS", "2")
    monkeypatch.setenv("DELTATUNE_NOTEBOOK_OUTPUT", str(tmp_path / "runs"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # One thread per process: on a small shared machine, intra-op threads fighting for cores cost far more
    # than they gain on a 135M model (conftest.py does the same for the test process).
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell and the traceback, on any error
    assert os.listdir(tmp_path / "runs")
