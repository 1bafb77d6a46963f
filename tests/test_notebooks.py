"""The notebooks run top to bottom at smoke size (TANGLENAS_SMOKE=1) and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_notebooks_are_stored_without_outputs():
  assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_compare_samplers.ipynb", "03_we_vs_ws.ipynb"]
  for path in NOTEBOOKS:
    notebook = nbformat.read(path, as_version=4)
    assert notebook.cells[1].source.count("SMOKE = ") == 1  # the switch, at the top
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow  # 1-2 CPU-minutes each at smoke size: in the default suite they would push it past 10 minutes
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_at_smoke_size(path, tmp_path, monkeypatch):
  monkeypatch.setenv("TANGLENAS_SMOKE", "1")
  monkeypatch.setenv("MPLBACKEND", "Agg")
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  assert [o for o in outputs if "image/png" in o.get("data", {})], "its figures must render in Jupyter"
