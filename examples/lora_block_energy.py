"""Why SCHEME's LoRA adapter is per group: the share of a dense rank-r update's energy (squared Frobenius norm) that
lies inside the diagonal blocks of a block-diagonal layer, i.e. what projecting a dense LoRA update onto the blocks
would keep. Random rank-r updates (standard normal factors) of DeiT-Tiny's fc1 and fc2 patched with groups=4,
expansion=8 (the model of ``tests/test_lora.py``), one update per seed.

    python examples/lora_block_energy.py      # writes examples/results/lora_block_energy.{md,json}
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.harness import machine, write_results  # noqa: E402
from tests.scenarios import patched_deit  # noqa: E402

RESULTS = ROOT / "examples" / "results" / "lora_block_energy"


def kept_energy(layer: torch.nn.Module, rank: int, seed: int) -> float:
    """||P(B A)||^2 / ||B A||^2 for B: (out, rank), A: (rank, in) standard normal, P the block mask of ``layer``.
    Drawn as ``tests/test_lora.py`` draws its update."""
    torch.manual_seed(seed)
    update = torch.randn(layer.out_features, rank) @ torch.randn(rank, layer.in_features)
    mask = torch.block_diag(*torch.ones_like(layer.weight).unbind(0))
    return float((update * mask).norm() ** 2 / update.norm() ** 2)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    mlp = patched_deit().blocks[0].mlp
    rows = []
    for name in ("fc1", "fc2"):
        layer = getattr(mlp, name)
        for rank in args.ranks:
            kept = [kept_energy(layer, rank, seed) for seed in range(args.seeds)]
            rows.append({"layer": name, "in_features": layer.in_features, "out_features": layer.out_features,
                         "groups": layer.groups, "rank": rank, "seeds": list(range(args.seeds)), "kept": kept})
    data = {"command": " ".join(["python examples/lora_block_energy.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "rows": rows}
    lines = ["# A dense rank-r update projected onto the diagonal blocks (measured)", "",
             f"`{data['command']}` on {data['machine']['cpu']}, torch {data['machine']['torch']}, "
             f"timm {data['machine']['timm']}. DeiT-Tiny patched with groups=4, expansion=8; share of a random "
             "rank-r update's squared norm inside the blocks (1/groups is what a uniform spread would give).", "",
             "| layer | shape (out x in) | groups | rank | seeds | kept: min-max | mean |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['out_features']} x {r['in_features']} | {r['groups']} | {r['rank']} | "
                     f"{r['seeds'][0]}-{r['seeds'][-1]} | {min(r['kept']):.3f}-{max(r['kept']):.3f} | "
                     f"{statistics.mean(r['kept']):.3f} |")
    text = "\n".join(lines) + "\n"
    write_results(args.out, data, text)


if __name__ == "__main__":
    main()
