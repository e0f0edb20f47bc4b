"""examples/checkpoints.ipynb runs end to end: save, reload, fuse, and push to a loopback Hub (on a copy with
the stored outputs cleared; the stored file is left as it is)."""
from __future__ import annotations

import pytest

nbclient = pytest.importorskip("nbclient")

from .hub_server import LocalHub, client_environment  # noqa: E402
from .notebooks import EXAMPLES, fresh_copy  # noqa: E402

NOTEBOOK = EXAMPLES / "checkpoints.ipynb"
TOKEN = "hf_notebook_test_31a9"


def _stdout(nb) -> str:
    # one stream can arrive in several chunks, split anywhere: join them as they were written
    return "".join(output.get("text", "") for cell in nb.cells for output in cell.get("outputs", [])
                   if output.get("name") == "stdout")


def test_checkpoints_notebook(tmp_path, monkeypatch):
    stored = NOTEBOOK.read_bytes()
    nb = fresh_copy(NOTEBOOK)  # the stored outputs cannot satisfy the checks below
    with LocalHub(tokens={TOKEN: "carol"}, lifetime=300) as hub:
        for key, value in client_environment(hub, str(tmp_path / "hf-home"), TOKEN).items():
            monkeypatch.setenv(key, value)  # the kernel process inherits them
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
        commits = hub.commits("carol/scheme-deit-tiny-demo")
    text = _stdout(nb)
    assert "identical: False" not in text
    assert "reloaded outputs identical: True" in text
    assert "reloaded fused outputs identical: True" in text
    assert "pushed:" in text and "pulled outputs identical: True" in text
    assert TOKEN not in text
    assert len(commits) == 2 and commits[0].message == "SCHEME DeiT-Tiny demo"
    assert NOTEBOOK.read_bytes() == stored
