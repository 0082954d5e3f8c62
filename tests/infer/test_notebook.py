"""colab/serving.ipynb runs headless (nbclient) from the colab/ folder, as the other notebooks."""

import os

import nbformat
from nbclient import NotebookClient

COLAB = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "colab")


def test_serving_notebook_executes(monkeypatch):
  monkeypatch.setenv("DSV3_NOTEBOOK_STEPS", "4")
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel is a fresh process: let it pick its devices
  nb = nbformat.read(os.path.join(COLAB, "serving.ipynb"), as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": COLAB}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
