"""Small-scale reproduction of SCHEME on scikit-learn's digits: dense MLPs against BD-MLP with and without
CCA, on a small ViT, same training budget for every configuration, several seeds.

    python examples/reproduce_digits.py                 # full run, ~15-25 min on 2 CPU cores
    python examples/reproduce_digits.py --quick         # a smoke run of a couple of minutes (not the results)
    python examples/reproduce_digits.py --report-only   # table and plots again from the JSON

Every training is one `timm-scheme train` run (timm_scheme/training/run.py). Writes to --out (default
examples/results/): digits_reproduction.json, digits_reproduction.md, digits_accuracy_vs_macs.png and
digits_cca_weight.png; the runs' own logs and checkpoints go to --work-dir.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Dict, List

HERE = Path(__file__).resolve().parent
RESULTS = "digits_reproduction"

# The small ViT every configuration shares: 16x16 digits (8x8 upsampled), 4x4 patches -> 16 tokens.
MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "4"]
VIT = ["embed_dim=64", "depth=4", "num_heads=2"]
# The training budget every configuration shares (timm AdamW, cosine schedule, label smoothing 0.1).
BUDGET = ["--epochs", "40", "--batch-size", "64", "--lr", "2e-3", "--weight-decay", "0.05",
          "--warmup-epochs", "2", "--smoothing", "0.1"]
QUICK_BUDGET = ["--epochs", "3", "--warmup-epochs", "1"]
ANNEAL_START = 0.5

# one training run each; scheme_e8_g4 is reported twice (with CCA, as trained; and fused, as deployed)
TRAININGS = {
    "dense_e4": ["--no-scheme", "--model-kwargs", *VIT],
    "dense_e8": ["--no-scheme", "--model-kwargs", *VIT, "mlp_ratio=8"],
    "bd_e8_g4": ["--groups", "4", "--expansion", "8", "--no-cca", "--model-kwargs", *VIT],
    "scheme_e8_g4": ["--groups", "4", "--expansion", "8", "--cca", "--cca-anneal", "off", "--model-kwargs", *VIT],
    "scheme_e8_g4_anneal": ["--groups", "4", "--expansion", "8", "--cca", "--cca-anneal-start", str(ANNEAL_START),
                            "--model-kwargs", *VIT],
}
# row -> (training it comes from, how it is measured)
ROWS = {
    "dense_e4": ("dense_e4", "timm's ViT as built: dense MLP, E=4 (baseline)"),
    "dense_e8": ("dense_e8", "dense MLP, E=8"),
    "bd_e8_g4": ("bd_e8_g4", "BD-MLP g=4, E=8, no CCA"),
    "scheme_e8_g4": ("scheme_e8_g4", "BD-MLP g=4, E=8 + CCA, evaluated as trained (CCA branch on, its MACs "
                                     "counted)"),
    "scheme_e8_g4_fused": ("scheme_e8_g4", "the same models after fuse_for_inference (CCA dropped, alpha "
                                           "folded): what gets deployed"),
    "scheme_e8_g4_anneal": ("scheme_e8_g4_anneal", f"BD-MLP + CCA, CCA annealed to 0 from {ANNEAL_START:.0%} of "
                                                   "training to the end; fused"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 epochs, 1 seed: checks the pipeline only")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (quick: 0)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run at once, one CPU thread each")
    parser.add_argument("--out", default=None, help="results folder (default examples/results, or "
                                                    "output/digits_reproduction_quick with --quick)")
    parser.add_argument("--work-dir", default=None, help="folder for the runs' logs and checkpoints")
    parser.add_argument("--report-only", action="store_true", help="rebuild table and plots from the JSON")
    args = parser.parse_args(argv)

    out = Path(args.out or (Path("output") / "digits_reproduction_quick" if args.quick else HERE / "results"))
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((out / f"{RESULTS}.json").read_text())
    else:
        seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
        work = Path(args.work_dir or Path("output") / ("digits_runs_quick" if args.quick else "digits_runs"))
        data = reproduce(seeds, args.jobs, args.quick, work)
        (out / f"{RESULTS}.json").write_text(json.dumps(_rounded(data), indent=1))
    (out / f"{RESULTS}.md").write_text(markdown_table(data))
    plot_accuracy_vs_macs(data, out / "digits_accuracy_vs_macs.png")
    plot_cca_weights(data, out / "digits_cca_weight.png")
    print(markdown_table(data))
    print(f"written to {out}")
    return 0


def reproduce(seeds: List[int], jobs: int, quick: bool, work: Path) -> Dict[str, Any]:
    budget = BUDGET + (QUICK_BUDGET if quick else [])
    tasks = [(name, seed, MODEL + budget + extra + ["--seed", str(seed), "--output", str(work / f"{name}_s{seed}")])
             for seed in seeds for name, extra in TRAININGS.items()]
    started = time.time()
    results: Dict[tuple, Dict[str, Any]] = {}
    context = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch thread pools
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(_train, argv): (name, seed) for name, seed, argv in tasks}
        for future in as_completed(futures):
            name, seed = futures[future]
            results[name, seed] = future.result()
            print(f"[{time.time() - started:6.0f}s] {name} seed {seed}: top-1 {results[name, seed]['top1']:.2f}%",
                  flush=True)

    runs = []
    for seed in seeds:
        for row, (training, _) in ROWS.items():
            runs.append(_row(row, seed, results[training, seed]))
    return dict(
        runs=runs,
        configs={row: dict(description=text, trained_as=training, train_args=MODEL + budget + TRAININGS[training])
                 for row, (training, text) in ROWS.items()},
        budget=dict(epochs=int(_last_value(budget, "--epochs")), train_images=results[tasks[0][:2]]["train_images"],
                    test_images=results[tasks[0][:2]]["eval_images"], seeds=seeds, quick=quick),
        machine=_machine(jobs, time.time() - started),
        generated_by="examples/reproduce_digits.py" + (" --quick" if quick else ""),
    )


def _train(argv: List[str]) -> Dict[str, Any]:
    """One training in a worker process: `timm-scheme train ARGV`, then what the report needs."""
    import logging
    import warnings
    import torch
    from timm_scheme.cli import train

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    warnings.simplefilter("ignore")  # fusing warns, by design, about the CCA it drops; the report shows it
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(argv + ["--no-progress", "--no-export", "--threads", "1"])
    started = time.time()
    code = train.run(args)
    out = Path(args.output)
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "log.json").read_text())["epochs"]
    summary["train_time_s"] = time.time() - started
    summary["exit_code"] = code
    summary["history"] = [dict(epoch=h["epoch"], top1=h["top1"], train_loss=h["train_loss"],
                               cca_limit=h["cca_limit"], cca_weights=h["cca_weights"],
                               cca_weights_learnt=h["cca_weights_learnt"]) for h in history]
    return summary


def _rounded(value: Any, digits: int = 6) -> Any:
    """Floats to 6 decimals: the JSON stays small; accuracies are multiples of 100/449 anyway."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def _last_value(flags: List[str], name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]


def _row(row: str, seed: int, s: Dict[str, Any]) -> Dict[str, Any]:
    training = ROWS[row][0]
    if row == "scheme_e8_g4":  # as trained: CCA on
        top1, macs = s["top1_with_cca"], s["macs_with_cca"]
    else:  # as deployed: eval mode equals the fused model
        top1, macs = s["top1_fused"], s["macs_fused"]
    return dict(
        config=row, seed=seed, top1=top1, params=s["params_fused"], macs=macs,
        cca_weight_final=s.get("cca_weight_final", 0.0),
        trained_as=training,
        top1_eval=s["top1"], top1_with_cca=s.get("top1_with_cca"), top1_fused=s["top1_fused"],
        params_unfused=s["params"], macs_fused=s["macs_fused"],
        cca_weights_final=s.get("cca_weights_final", {}),
        cca_weights_learnt_final=s.get("cca_weights_learnt_final", {}),
        fuse_relative_change_vs_training_function=s.get("fuse_relative_change_vs_training_function"),
        fuse_verified=s.get("verified"), epochs=s["epochs"], train_time_s=round(s["train_time_s"], 1),
        history=s["history"],
    )


def _machine(jobs: int, wall: float) -> Dict[str, Any]:
    import torch
    import timm
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(cpu=cpu, cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                torch=torch.__version__, timm=timm.__version__, jobs=jobs, threads_per_job=1,
                wall_time_s=round(wall, 1), date=time.strftime("%Y-%m-%d"),
                note="CPU shared with other work while measuring; times are indicative only")


# ------------------------------------------------------------------------------------------- report

def summarise(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per config: mean and sample std over seeds."""
    rows = []
    for config, meta in data["configs"].items():
        runs = [r for r in data["runs"] if r["config"] == config]
        if not runs:
            continue
        top1 = [r["top1"] for r in runs]
        cca = [r["cca_weight_final"] for r in runs]
        rows.append(dict(config=config, description=meta["description"], n=len(runs),
                         top1_mean=statistics.mean(top1), top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.0,
                         params=runs[0]["params"], macs=runs[0]["macs"], cca_mean=statistics.mean(cca)))
    return rows


def markdown_table(data: Dict[str, Any]) -> str:
    m, b = data["machine"], data["budget"]
    lines = [
        f"Digits (scikit-learn, {b['train_images']} train / {b['test_images']} test images, 16x16), ViT "
        f"embed 64, depth 4, 4x4 patches; {b['epochs']} epochs each, seeds {b['seeds']}. "
        f"Measured {m['date']} on {m['cpu']} ({m['cpu_count']} cores, shared), torch {m['torch']}, "
        f"timm {m['timm']}; {m['wall_time_s'] / 60:.0f} min wall for all runs, {m['jobs']} at a time, one thread "
        "each.",
        "",
        "| config | top-1 % (mean ± std) | params | MACs / image | final 1 - alpha | what |",
        "|---|---|---|---|---|---|",
    ]
    for r in summarise(data):
        cca = f"{r['cca_mean']:.3f}" if r["config"].startswith("scheme") else "-"
        lines.append(f"| `{r['config']}` | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} (n={r['n']}) | "
                     f"{r['params']:,} | {r['macs']:,} | {cca} | {r['description']} |")
    lines += ["", "final 1 - alpha: mean over layers and seeds of the CCA weight in effect at the end of training "
                  "(after annealing); fusing discards exactly that share of each mixer's output.", ""]
    return "\n".join(lines)


def plot_accuracy_vs_macs(data: Dict[str, Any], path: Path) -> None:
    """One point per row (mean ± std over seeds), named in a legend beside the axes: rows that share a MAC count
    (every BD-MLP deployment) are drawn a few points apart horizontally, so neither points nor names overlap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import offset_copy
    rows = summarise(data)
    fig, ax = plt.subplots(figsize=(8.4, 4.2))
    markers = "osD^vP*X"
    for i, r in enumerate(rows):
        same = [q["config"] for q in rows if q["macs"] == r["macs"]]
        dodge = (same.index(r["config"]) - (len(same) - 1) / 2) * 9  # points, on screen only
        ax.errorbar(r["macs"] / 1e6, r["top1_mean"], yerr=r["top1_std"], fmt=markers[i % len(markers)], capsize=4,
                    color=f"C{i}", label=f"{r['config']}: {r['top1_mean']:.1f} ± {r['top1_std']:.1f}",
                    transform=offset_copy(ax.transData, fig=fig, x=dodge, y=0, units="points"))
        # the offset transform keeps the artists out of autoscaling: give the axes their data extent
        ax.update_datalim([(r["macs"] / 1e6, r["top1_mean"] - r["top1_std"]),
                           (r["macs"] / 1e6, r["top1_mean"] + r["top1_std"])])
    ax.set_xlabel("MACs per image (millions; rows with equal MACs drawn side by side)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("digits: accuracy vs MACs (mean ± std over seeds)", fontsize=10)
    ax.margins(x=0.08, y=0.08)
    ax.autoscale_view()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
              title="config: top-1 %", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cca_weights(data: Dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [c for c in ("scheme_e8_g4", "scheme_e8_g4_anneal") if any(r["config"] == c for r in data["runs"])]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.6 * max(len(panels), 1), 3.8), squeeze=False)
    for ax, config in zip(axes[0], panels):
        runs = [r for r in data["runs"] if r["config"] == config]
        layers = list(runs[0]["history"][0]["cca_weights"])
        epochs = [h["epoch"] for h in runs[0]["history"]]
        for i, layer in enumerate(layers):
            color = f"C{i}"
            effective = [statistics.mean(r["history"][e]["cca_weights"][layer] for r in runs) for e in range(len(epochs))]
            ax.plot(epochs, effective, color=color, label=f"{layer}")
            if config.endswith("anneal"):
                learnt = [statistics.mean(r["history"][e]["cca_weights_learnt"][layer] for r in runs)
                          for e in range(len(epochs))]
                ax.plot(epochs, learnt, color=color, linestyle="--", alpha=0.6)
        top = max(max(r["history"][e]["cca_weights"][layer], r["history"][e]["cca_weights_learnt"].get(layer, 0.0))
                  for r in runs for e in range(len(epochs)) for layer in layers)
        ax.set_ylim(0, max(0.6, 1.1 * top))
        ax.set_xlabel("epoch")
        ax.set_ylabel("1 - alpha (mean over seeds)")
        title = config + (" (solid: in effect, dashed: learnt)" if config.endswith("anneal") else " (learnt, free)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
