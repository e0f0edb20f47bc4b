"""The example notebooks execute top to bottom (nbclient, the python3 kernel of this environment)."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# checkpoints.ipynb needs a loopback Hub: tests/test_notebooks_checkpoints.py runs it
NOTEBOOKS = [EXAMPLES / "quickstart.ipynb", EXAMPLES / "reproduction.ipynb", EXAMPLES / "dense_init.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel process inherits it
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        f"{path.name}: clear the outputs before committing"
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
