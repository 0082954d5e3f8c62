"""The Colab notebooks run headless (nbclient) from the colab/ folder."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "colab")


@pytest.mark.parametrize("name", ["quickstart.ipynb", "cost_models.ipynb"])
def test_notebook_executes(name, monkeypatch):
  monkeypatch.setenv("DSV3_NOTEBOOK_STEPS", "8")
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel is a fresh process: let it pick its devices
  nb = nbformat.read(os.path.join(COLAB, name), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": COLAB}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
