"""The example notebooks: stored executed, and they execute top to bottom (nbclient, the python3 kernel of
this environment) on a copy with the outputs cleared; the stored file is left as it is."""
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from .notebooks import EXAMPLES, fresh_copy, stored_problems  # noqa: E402

# checkpoints.ipynb needs a loopback Hub: tests/test_notebooks_checkpoints.py runs it
NOTEBOOKS = [EXAMPLES / "quickstart.ipynb", EXAMPLES / "reproduction.ipynb", EXAMPLES / "dense_init.ipynb"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.ipynb")), ids=lambda p: p.stem)
def test_notebook_stored_executed(path):
    assert stored_problems(path) == [], path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel process inherits it
    stored = path.read_bytes()
    nb = fresh_copy(path)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    code = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]
    assert all(cell.execution_count for cell in code)
    assert path.read_bytes() == stored
