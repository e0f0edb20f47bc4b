"""The example notebooks are stored executed, outputs and plots included. Tests run a copy with the outputs
cleared, so a stored output can never pass for a fresh one, and never write the stored file."""
from pathlib import Path

import nbformat

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# a stored notebook with its outputs; larger means progress bars or data dumps crept in
MAX_STORED_BYTES = 1_000_000


def fresh_copy(path: Path) -> nbformat.NotebookNode:
    """The notebook at ``path`` as nbclient would run it from scratch: outputs and execution counts cleared."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    return nb


def stored_problems(path: Path) -> list:
    """What keeps the stored notebook at ``path`` from being an executed one: [] when it ran top to bottom
    in one kernel, without errors, and every plotting cell kept its image."""
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code" and cell.source.strip()]
    problems = []
    counts = [cell.execution_count for cell in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(f"execution counts {counts}: execute it top to bottom in a fresh kernel, then store it")
    for i, cell in enumerate(code):
        kinds = [output.output_type for output in cell.outputs]
        if "error" in kinds:
            problems.append(f"code cell {i} stored with an error")
        if ("plt." in cell.source or "Image(" in cell.source) and not any(
                "image/png" in output.get("data", {}) for output in cell.outputs):
            problems.append(f"code cell {i} draws a figure but stores no image/png output")
    size = path.stat().st_size
    if size > MAX_STORED_BYTES:
        problems.append(f"{size:,} bytes stored: keep outputs small (no progress bars, no data dumps)")
    return problems
