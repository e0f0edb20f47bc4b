"""Timing harness: interleaved rounds, medians, ratios measured side by side; machine description; tables."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from timm_scheme.io.artifacts import staged_file


@dataclass
class Timing:
    name: str
    samples: List[float] = field(default_factory=list)  # seconds per call, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)


@dataclass
class Settings:
    rounds: int = 7
    sample_seconds: float = 0.25   # each round times enough calls to last about this long
    warmup: int = 1
    clock: str = "wall"            # "wall" or "cpu" (process CPU time: robust to a shared, busy machine)
    device: str = "cpu"

    def now(self) -> float:
        return time.process_time() if self.clock == "cpu" else time.perf_counter()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def compare(fns: Dict[str, Callable[[], object]], settings: Settings) -> Dict[str, Timing]:
    """Time every callable in interleaved rounds (order rotated each round), after warm-up.

    Each round measures every variant once, back to back, so slow drifts of a shared machine (another
    job starting, frequency changes) hit all of them alike; ratios are then taken per round.
    """
    names = list(fns)
    inner = {}
    for name in names:
        for _ in range(settings.warmup):
            fns[name]()
        settings.sync()
        start = settings.now()
        fns[name]()
        settings.sync()
        once = max(settings.now() - start, 1e-6)
        inner[name] = max(1, min(50, math.ceil(settings.sample_seconds / once)))
    timings = {name: Timing(name) for name in names}
    for r in range(settings.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            settings.sync()
            start = settings.now()
            for _ in range(inner[name]):
                fns[name]()
            settings.sync()
            timings[name].samples.append((settings.now() - start) / inner[name])
    return timings


def ratio(timings: Dict[str, Timing], slower: str, faster: str) -> float:
    """Median over rounds of time(slower) / time(faster): > 1 means `faster` is faster."""
    a, b = timings[slower].samples, timings[faster].samples
    return statistics.median(x / y for x, y in zip(a, b))


def machine() -> Dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x {len(names)} logical CPUs"
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "machine": platform.machine(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "mkl": str(torch.backends.mkl.is_available()),
        "mkldnn": str(torch.backends.mkldnn.is_available()),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        import timm
        info["timm"] = timm.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def write_results(stem: Path, data: object, text: str) -> None:
    """``stem.json`` (the data) and ``stem.md`` (its table), each written beside its target and renamed into place,
    so an interrupted run leaves the previous results whole; prints the table."""
    for suffix, content in ((".json", json.dumps(data, indent=1)), (".md", text)):
        with staged_file(stem.with_suffix(suffix)) as partial:
            partial.write_text(content)
    print(text)


def load_average() -> Optional[str]:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return None


@dataclass
class Table:
    title: str
    columns: Sequence[str]
    rows: List[Sequence[object]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def add(self, *row: object) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join("---" for _ in self.columns) + "|"]
        out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in self.rows]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out) + "\n"

    def to_dict(self) -> Dict[str, object]:
        return {"title": self.title, "columns": list(self.columns), "rows": [list(r) for r in self.rows],
                "notes": self.notes}


def _fmt(v: object) -> str:
    if isinstance(v, float):
        if v == 0 or math.isnan(v):
            return f"{v:.3g}"
        return f"{v:.2f}" if abs(v) >= 0.995 else f"{v:.3g}"
    return str(v)


def ms(t: Timing) -> float:
    return t.median * 1e3
