"""The speed-ups of a benchmark run as a chart: per table, one horizontal bar a comparison row, a line at 1.0.

    python -m benchmarks.plot benchmarks/results/cpu-2026-11-24-1thread-cputime.md [more results ...]

writes ``<name>.png`` next to each results file, from its ``<name>.json`` where there is one (the full figures),
else from the ``.md`` tables. ``python -m benchmarks.run`` writes the chart of its own run the same way.

Which figure a table's bar shows: its first speed-up column (a speedup, throughput or ``dense / SCHEME`` ratio:
above 1, the row is faster than the reference), or, in a table of time ratios (``time / dense``, ``... t / dense
t``), the reference's time over the row's (the inverse, so that above 1 means faster in every panel). Tables with
neither (costs per token alone) are left out, and so are rows that time one op of a whole (``parts: ...``) and rows
without a figure.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

SPEEDUP = re.compile(r"speedup|throughput|^ratio$|dense / SCHEME|dense t / SCHEME t", re.IGNORECASE)
TIME_RATIO = re.compile(r"^time / |\bt / dense t\b", re.IGNORECASE)
PARTS = "parts:"


def speedup_column(columns: Sequence[str]) -> Optional[Tuple[int, bool]]:
    """The index of the column a table's bars show, and whether it is a time ratio (shown inverted); None for a
    table with no ratio to the reference."""
    for i, column in enumerate(columns):
        if SPEEDUP.search(column):
            return i, False
    for i, column in enumerate(columns):
        if TIME_RATIO.search(column):
            return i, True
    return None


def _row_label(columns: Sequence[str], row: Sequence[Any]) -> str:
    """The cells that name a row: those before its first measured (float) cell; whole numbers as "224 px",
    "batch 8" (token counts left out: they follow from the image size)."""
    parts = []
    for column, cell in zip(columns, row):
        if isinstance(cell, float):
            break
        if isinstance(cell, int) and not isinstance(cell, bool):
            if "token" not in column:
                parts.append(f"{cell} px" if column.endswith("px") else f"{column} {cell}")
        elif str(cell).strip():
            parts.append(str(cell))
    return ", ".join(parts)


def speedups(table: Dict[str, Any]) -> Optional[Tuple[str, List[Tuple[str, float]]]]:
    """A table's bars: what they show (the column, or "1 / (column)" for a time ratio) and (row label, speed-up)
    for each comparison row; None where the table has no ratio column or no row with a figure."""
    chosen = speedup_column(table["columns"])
    if chosen is None:
        return None
    index, inverted = chosen
    bars = []
    for row in table["rows"]:
        value = row[index] if index < len(row) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            continue
        label = _row_label(table["columns"], row)
        if label.startswith(PARTS):
            continue
        bars.append((label, 1.0 / value if inverted else float(value)))
    if not bars:
        return None
    column = table["columns"][index]
    return (f"1 / ({column})" if inverted else column), bars


def _cell(text: str) -> Any:
    text = text.strip()
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_markdown(text: str) -> Dict[str, Any]:
    """A results ``.md`` as ``benchmarks.run`` writes its ``.json``: mode, date, machine, clock and the tables
    (title, columns, rows with numbers as numbers, notes). Figures are as printed (3 significant digits)."""
    result: Dict[str, Any] = {"mode": "", "date": "", "machine": {}, "clock": "", "tables": []}
    table: Optional[Dict[str, Any]] = None
    for line in text.splitlines():
        if line.startswith("# "):
            found = re.search(r"\((\w+) run\)", line)
            result["mode"] = found.group(1) if found else ""
        elif line.startswith("### "):
            table = {"title": line[4:].strip(), "columns": [], "rows": [], "notes": []}
            result["tables"].append(table)
        elif line.startswith("|") and table is not None:
            cells = [c for c in line.strip().strip("|").split("|")]
            if not table["columns"]:
                table["columns"] = [c.strip() for c in cells]
            elif not set(line.replace("|", "").strip()) <= {"-", ":"}:
                table["rows"].append([_cell(c) for c in cells])
        elif line.startswith("- "):
            if table is not None:
                table["notes"].append(line[2:])
            elif ": " in line:
                key, value = line[2:].split(": ", 1)
                if key == "date":
                    result["date"] = value
                elif key == "clock":
                    result["clock"] = value.split(";")[0]
                elif not key.startswith("load average"):
                    result["machine"][key] = value
    return result


def load(path: Path) -> Dict[str, Any]:
    """A results file's run: its ``.json`` where there is one beside it (or given), else its ``.md`` parsed."""
    path = Path(path)
    if path.with_suffix(".json").is_file():
        return json.loads(path.with_suffix(".json").read_text())
    if path.suffix == ".md" and path.is_file():
        return parse_markdown(path.read_text())
    raise FileNotFoundError(f"{path}: no results file (.json or .md) there")


def plot_speedups(run: Dict[str, Any], path: Path) -> Path:
    """The chart of a run's speed-ups (``run`` as ``benchmarks.run`` writes its ``.json``), written to ``path``."""
    panels = [(table["title"], *found) for table in run.get("tables", []) if (found := speedups(table))]
    if not panels:
        raise ValueError("no table with a speed-up or time-ratio column to plot")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [1.0 + 0.3 * len(bars) for _, _, bars in panels]
    top = 0.45  # inches for the run's title
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, sum(heights) + top), squeeze=False,
                             gridspec_kw=dict(height_ratios=heights))
    for ax, (title, column, bars) in zip(axes[:, 0], panels):
        labels = [textwrap.shorten(label, 80, placeholder="...") for label, _ in bars]
        values = [value for _, value in bars]
        y = range(len(bars))
        ax.barh(y, values, color=["tab:blue" if v >= 1.0 else "tab:orange" for v in values], height=0.7)
        ax.axvline(1.0, color="black", linewidth=0.9)
        for i, value in enumerate(values):
            shown = f"{value:.3f}" if round(value, 2) == 1.0 and value != 1.0 else f"{value:.2f}"  # 0.996: not 1.00
            ax.text(value, i, f" {shown}x", va="center", fontsize=7.5)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()  # the table's order, top to bottom
        ax.set_xlim(0, max(1.1, max(values) * 1.15))
        ax.set_title(textwrap.fill(f"{title} [bars: {column}]", 90), fontsize=8.5, loc="left")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("speed-up (above 1: faster than the reference)")
    machine = run.get("machine", {})
    described = ", ".join(x for x in (machine.get("cpu"), machine.get("threads") and f"{machine['threads']} thread(s)",
                                      run.get("clock") and f"{run['clock']} clock") if x)
    fig.suptitle(textwrap.fill(f"timm-scheme benchmarks ({run.get('mode') or '?'} run, "
                               f"{str(run.get('date', ''))[:10]}): {described}", 120), fontsize=10, y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 1 - top / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results .md or .json (benchmarks/results/...)")
    args = parser.parse_args(argv)
    for path in args.results:
        try:
            run = load(path)
        except FileNotFoundError as error:
            parser.error(str(error))
        print(f"wrote {plot_speedups(run, path.with_suffix('.png'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
