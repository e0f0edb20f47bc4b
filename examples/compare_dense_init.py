"""Two runs of ``examples/convert_pretrained.py`` side by side, seed by seed: what one setting (e.g. ``--alpha-init
0.5``) changes against another (the defaults), for every conversion, at step 0 and after the fine-tune.

    python examples/convert_pretrained.py --alpha-init 0.5 --seeds 3 --out examples/results/dense_init_alpha_0.5
    python examples/compare_dense_init.py examples/results/dense_init_alpha_0.5/dense_init.json \\
        examples/results/dense_init.json --out examples/results/dense_init_alpha_0.5/against_defaults

Writes ``OUT.md`` and ``OUT.json``. A seed pairs only where both runs trained the same dense model
(``same_dense_model``): runs of other code or another machine train other dense models from the same seed, and their differences
say nothing about the setting; the report names any seed left out so.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # run as a script or through runpy

from benchmarks.harness import write_results  # noqa: E402
from convert_pretrained import CONVERSIONS, DISTILLED, DISTILLED_FROM  # noqa: E402


def same_dense_model(a: Dict[str, Any], b: Dict[str, Any]) -> bool:
    """Whether two runs of one seed trained the same dense model: equal dense top-1, and equal output errors of the
    naive diagonal-block conversion per layer (a function of the dense weights alone; the converted model computes
    the block projection whatever its ``alpha_init``, up to the rounding of fc2's 1 / alpha scale)."""
    if a["dense_top1"] != b["dense_top1"]:
        return False
    for expansion in set(a["expansions"]) & set(b["expansions"]):
        errors_a, errors_b = (r["expansions"][expansion]["diagonal"]["layer_output_error"] for r in (a, b))
        if errors_a.keys() != errors_b.keys() or any(abs(errors_a[k] - errors_b[k]) > 1e-4 * abs(errors_b[k])
                                                     for k in errors_b):
            return False
    return True


def compare(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Any]:
    runs_a, runs_b = ({r["seed"]: r for r in d["runs"]} for d in (a, b))
    shared = sorted(set(runs_a) & set(runs_b))
    paired = [s for s in shared if same_dense_model(runs_a[s], runs_b[s])]
    rows = []
    for expansion in runs_a[shared[0]]["expansions"] if shared else []:
        for kind in [*CONVERSIONS, *(k + DISTILLED for k in DISTILLED_FROM)]:
            for key in ("step0_top1", "finetuned_top1"):
                if key not in runs_a[shared[0]]["expansions"][expansion].get(kind, {}):
                    continue
                diffs = {s: 100 * (runs_a[s]["expansions"][expansion][kind][key]
                                   - runs_b[s]["expansions"][expansion][kind][key]) for s in paired}
                rows.append({"expansion": expansion, "conversion": kind, "measure": key, "a_minus_b_points": diffs})
    return {"a": a["generated_by"], "b": b["generated_by"], "seeds_shared": shared, "seeds_paired": paired,
            "seeds_left_out": [s for s in shared if s not in paired], "rows": rows}


def markdown(result: Dict[str, Any], command: str) -> str:
    lines = ["# Two runs of `examples/convert_pretrained.py`, seed by seed", "",
             f"`{command}`: A = `{result['a']}`, B = `{result['b']}`. Top-1 points, A minus B, per seed and mean.", ""]
    if result["seeds_left_out"]:
        lines += [f"Seeds {result['seeds_left_out']} left out: the two runs trained different dense models from them "
                  "(other code or another machine).", ""]
    if not result["seeds_paired"]:
        return "\n".join(lines + ["No seed pairs: nothing to compare."]) + "\n"
    lines += [f"Seeds paired: {result['seeds_paired']}.", "",
              "| E | conversion | measure | A - B per seed | mean |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        diffs = list(r["a_minus_b_points"].values())
        label = "top-1 at step 0" if r["measure"] == "step0_top1" else "top-1 after fine-tune (fused)"
        lines.append(f"| {r['expansion']} | {r['conversion']} | {label} | "
                     f"{' / '.join(f'{d:+.1f}' for d in diffs)} | {statistics.mean(diffs):+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="dense_init.json of the setting under test")
    parser.add_argument("b", type=Path, help="dense_init.json to compare it with (e.g. the defaults)")
    parser.add_argument("--out", type=Path, required=True, help="OUT.md and OUT.json are written")
    args = parser.parse_args(argv)
    result = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
    command = " ".join(["python examples/compare_dense_init.py", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(result, command)
    write_results(args.out, {"command": command, **result}, text)
    return 0 if result["seeds_paired"] else 1


if __name__ == "__main__":
    sys.exit(main())
