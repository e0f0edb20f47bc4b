"""Parameters and MACs of the SCHEMEformer family (``schemeformer_ppaa_{s12,s24,s36}{,_g2,_g8}_224``) and of the
same MetaFormer PPAA with timm's dense E=4 MLPs, at 224 px and 1000 classes, batch 1, with the package's own
counters (``timm_scheme.stats.count_params``, ``timm_scheme.count_macs``):

- params, fused: the inference form (``fuse_for_inference``: CCA removed); params, training form: unfused;
- MACs, inference: the fused model's forward;
- MACs, training with CCA: the unfused model's forward with every mixer's CCA branch computed, as while it is
  not yet annealed out (``count_macs(..., with_cca=True)``; forward only).

    python examples/schemeformer_costs.py      # writes examples/results/schemeformer_costs.{md,json}

One thread, random initialisation (``pretrained=False``): counts do not depend on the weights.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import timm
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import timm_scheme  # noqa: E402  (registers the SCHEMEformer family in timm)
from benchmarks.harness import machine, write_results  # noqa: E402
from timm_scheme.models.schemeformer import ppaa_metaformer_kwargs  # noqa: E402
from timm_scheme.stats import count_macs, count_mlp_params, count_params  # noqa: E402

RESULTS = ROOT / "examples" / "results" / "schemeformer_costs"
INPUT_SIZE = (3, 224, 224)
NUM_CLASSES = 1000


def family() -> List[str]:
    return timm.list_models("schemeformer_ppaa_*")


def check_names(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in family()]
    if unknown:
        raise ValueError(f"not SCHEMEformer models: {', '.join(unknown)} (known: {', '.join(family())})")


def _create(name: str) -> nn.Module:
    check_names([name])
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)


def depths(model: nn.Module) -> List[int]:
    return [len(stage.blocks) for stage in model.stages]


def measure(name: str) -> Dict:
    """The counts of one SCHEMEformer model: training form first, then fused in place."""
    model = _create(name)
    row = {"model": name, "groups": model.scheme_config.groups, "expansion": model.scheme_config.expansion,
           "depths": depths(model), "params_training": count_params(model),
           "macs_training_cca": count_macs(model, INPUT_SIZE, with_cca=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # at initialisation there is no CCA weight worth warning about
        timm_scheme.fuse_for_inference(model)
    row["params_fused"] = count_params(model)
    row["macs_inference"] = count_macs(model, INPUT_SIZE)
    return row


def dense_counterpart(scheme_model: nn.Module) -> nn.Module:
    """The SCHEMEformer's MetaFormer with timm's own MLPs (E=4, fixed by MetaFormer): the arguments of the
    family's registration, the depths read from the model."""
    from timm.models.metaformer import MetaFormer
    return MetaFormer(**ppaa_metaformer_kwargs(tuple(depths(scheme_model))), num_classes=NUM_CLASSES)


def measure_dense(name: str) -> Dict:
    """The counts of the dense E=4 counterpart of SCHEMEformer ``name``; it must be the same model outside the
    MLPs (else the comparison on the docs page would not be like for like)."""
    scheme = _create(name)
    dense = dense_counterpart(scheme)
    mlps = list(timm_scheme.scheme_mixers(scheme))
    outside = count_params(scheme) - count_mlp_params(scheme, mlps), count_params(dense) - count_mlp_params(dense, mlps)
    if outside[0] != outside[1]:
        raise RuntimeError(f"the dense counterpart of {name} differs outside its MLPs: {outside[1]:,} parameters "
                           f"against {outside[0]:,}")
    return {"model": f"dense E=4 S{sum(depths(scheme))}", "depths": depths(scheme),
            "params": count_params(dense), "macs": count_macs(dense, INPUT_SIZE)}


def _m(n: int) -> str:
    return f"{n:,} ({n / 1e6:.2f} M)"


def _g(n: int) -> str:
    return f"{n:,} ({n / 1e9:.2f} G)"


def markdown(data: Dict) -> str:
    m = data["machine"]
    lines = ["# SCHEMEformer parameters and MACs (measured)", "",
             f"`{data['command']}` on {m['cpu']}, {m['threads']} thread, torch {m['torch']}, timm {m['timm']}; "
             f"{data['wall_time_s']:.0f} s. Input {'x'.join(map(str, data['input_size']))}, batch 1, "
             f"{data['num_classes']} classes; MACs per torch's FlopCounterMode with the attention of the CPU "
             "fused kernel added (`timm_scheme.count_macs`).", "",
             "| model | groups | params, fused | params, training form | MACs, inference | "
             "MACs, training with CCA |", "|---|---|---|---|---|---|"]
    for r in data["models"]:
        lines.append(f"| {r['model']} | {r['groups']} | {_m(r['params_fused'])} | {_m(r['params_training'])} | "
                     f"{_g(r['macs_inference'])} | {_g(r['macs_training_cca'])} |")
    if data["dense"]:
        lines += ["", "The same MetaFormer PPAA with timm's dense E=4 MLPs (no CCA: one form):", "",
                  "| model | depths | params | MACs |", "|---|---|---|---|"]
        lines += [f"| {r['model']} | {'/'.join(map(str, r['depths']))} | {_m(r['params'])} | {_g(r['macs'])} |"
                  for r in data["dense"]]
        # the page's claim that g=2 costs what the dense E=4 model does, checked on these counts
        same = {tuple(d["depths"]): d["macs"] for d in data["dense"]}
        lines += [""] + [f"- {r['model']}: inference MACs {r['macs_inference'] - same[tuple(r['depths'])]:+,} "
                         "against the dense E=4 model" for r in data["models"] if r["groups"] == 2]
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="a subset of the family (default: all nine)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results stem: writes STEM.json and STEM.md")
    args = parser.parse_args(argv)
    names = args.models or family()
    try:
        check_names(names)  # before anything is measured
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows, dense, seen = [], [], set()
    for name in names:
        rows.append(measure(name))
        print(rows[-1], flush=True)
        if tuple(rows[-1]["depths"]) not in seen:  # one dense counterpart per depth
            seen.add(tuple(rows[-1]["depths"]))
            dense.append(measure_dense(name))
            print(dense[-1], flush=True)
    data = {"command": " ".join(["python examples/schemeformer_costs.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(), "wall_time_s": time.perf_counter() - start,
            "input_size": list(INPUT_SIZE), "num_classes": NUM_CLASSES, "models": rows, "dense": dense}
    write_results(args.out, data, markdown(data))


if __name__ == "__main__":
    main()
