"""``timm-scheme export``: a training checkpoint of a SCHEME model -> a fused, verified timm checkpoint folder
(``config.json`` + ``model.safetensors`` + ``README.md``), optionally pushed to the Hugging Face Hub.

    timm-scheme export --model deit_tiny_patch16_224 --groups 4 --expansion 8 \\
        --checkpoint output/train/model_best.pth.tar --output out/scheme-deit-tiny [--push-to-hub org/name] \\
        [--onnx out/scheme-deit-tiny.onnx] [--torchscript out/scheme-deit-tiny.pt]

The checkpoint is read with ``torch.load(weights_only=True)``: timm's train-script format (a dict with
``state_dict`` / ``state_dict_ema``, its ``args`` allowed), a bare state dict, or a ``.safetensors`` file.
Model arguments and SCHEME options not given on the command line are taken from the checkpoint's ``args`` when
it has them, and the SCHEME structure otherwise from its weights (``timm_scheme.io.training_checkpoint``).
"""
from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import timm
import torch
from timm.models._input import get_model_input_config
from timm.utils import ParseKwargs
from torch import nn

from ..fuse import FuseVerificationError, fuse_for_inference
from ..io import save_pretrained
from ..io.artifacts import ExportVerificationError
from ..io.format import CheckpointFormatError
from ..io.hub import push_folder_to_hub
from ..io.onnx import export_onnx
from ..io.torchscript import export_torchscript
from ..io.training_checkpoint import rebuild
from ..mixers import is_fused
from ..stats import count_macs, count_params
from .scheme_flags import add_scheme_flags, scheme_flags_given

_logger = logging.getLogger(__name__)
_STEPS = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="training checkpoint (.pth/.pth.tar from timm's train script, or .safetensors)")
    parser.add_argument("--output", required=True, metavar="DIR", help="checkpoint folder to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    parser.add_argument("--use-ema", action="store_true", help="export the EMA weights (state_dict_ema)")
    parser.add_argument("--no-fuse", action="store_true",
                        help="export the unfused training form (CCA kept) instead of the fused inference form")
    parser.add_argument("--onnx", default=None, metavar="PATH",
                        help="also write the fused model as an ONNX file (dynamic batch, checked in onnxruntime; "
                             "needs onnx, onnxscript, onnxruntime)")
    parser.add_argument("--torchscript", default=None, metavar="PATH",
                        help="also write the fused model as a TorchScript file (torch.jit.script; load with "
                             "torch.jit.load), checked against the eager model")
    model = parser.add_argument_group("model (defaults: the checkpoint's training args, if any)")
    model.add_argument("--model", default=None, help="timm model name that was patched")
    model.add_argument("--num-classes", type=int, default=None,
                       help="classes of the head (default: read from the checkpoint)")
    model.add_argument("--img-size", type=int, default=None)
    model.add_argument("--in-chans", type=int, default=None)
    model.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs, metavar="KEY=VALUE",
                       help="other timm.create_model arguments, e.g. patch_size=8")
    add_scheme_flags(parser, "SCHEME options the model was patched with (defaults: the checkpoint's record, else "
                             "what its weights show, else SchemeConfig's)")
    check = parser.add_argument_group("fuse check")
    check.add_argument("--batch-size", type=int, default=8, help="random inputs to compare outputs on")
    check.add_argument("--tolerance", type=float, default=1e-5,
                       help="largest allowed max|fused - unfused| / max|unfused| on the batch")
    check.add_argument("--seed", type=int, default=0)
    card = parser.add_argument_group("model card")
    card.add_argument("--base-model", default=None, metavar="HUB_ID", help="weights training started from")
    card.add_argument("--license", default=None)
    hub = parser.add_argument_group("Hugging Face Hub (token: HF_TOKEN or `hf auth login`)")
    hub.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload the folder, one commit")
    hub.add_argument("--private", action="store_true", help="create the repository private")
    hub.add_argument("--revision", default=None, help="existing branch to commit to")
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    hub.add_argument("--commit-message", default="Upload SCHEME model with timm-scheme")


def run(args: argparse.Namespace) -> int:
    if not getattr(args, "verbose", False):
        logging.getLogger("timm").setLevel(logging.WARNING)  # its per-load messages; the steps say it all
        logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # one line per graph rewrite with --onnx
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fuse_for_inference's warning is in the report
            return _run(args)
    except (CheckpointFormatError, FileNotFoundError, FileExistsError, ValueError, ImportError,
            ExportVerificationError, FuseVerificationError) as e:
        print(f"error: {e}")
        return 2


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    output = Path(args.output)
    if output.exists() and not args.overwrite:  # fail before the slow part; save_pretrained checks it again
        raise FileExistsError(f"--output {output} already exists; pass --overwrite to replace it")
    _check_file_options(args)

    _step(1, f"reading {args.checkpoint} (torch.load weights_only=True) and rebuilding its model")
    given = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size),
                               ("in_chans", args.in_chans)) if v is not None}
    rebuilt = rebuild(args.checkpoint, use_ema=args.use_ema, model_name=args.model,
                      model_kwargs={**(args.model_kwargs or {}), **given} if args.model_kwargs is not None or given
                      else None, scheme_options=scheme_flags_given(args))
    info, model, name, kwargs, config = rebuilt.info, rebuilt.model, rebuilt.name, rebuilt.kwargs, rebuilt.config
    print(f"      {len(model.state_dict())} tensors from "
          f"{repr(info['key']) if info['key'] else 'a bare state dict'}"
          + "".join(f", {k} {info[k]}" for k in ("epoch", "metric") if info.get(k) is not None))
    _step(2, f"built {name} ({_kwargs_text(kwargs)}) with SCHEME {config.describe()}")
    for text in rebuilt.origin:
        print(f"      {text}")
    model.eval()
    params_unfused = count_params(model)

    generator = torch.Generator().manual_seed(args.seed)
    input_size = tuple(get_model_input_config(model)["input_size"])
    x = torch.randn(args.batch_size, *input_size, generator=generator)

    report = None
    if args.no_fuse or rebuilt.already_fused:
        _step(3, "checking the model" + (" (already fused in the checkpoint)" if rebuilt.already_fused else
                                         " (--no-fuse: exporting the unfused training form)"))
    else:
        _step(3, f"fusing and checking against the unfused eval output on {args.batch_size} random inputs")
        fuse_for_inference(model, x, tolerance=args.tolerance)  # raises, and nothing is written, if they differ
        report = model.scheme_fuse_report
        if report.nothing_to_fuse:
            print(f"      {report.summary()}")
        else:
            print(f"      max |fused - unfused| / max |unfused| = {report.eval_difference:.2e} "
                  f"(tolerance {args.tolerance:g})")
    with torch.no_grad():
        reference = model(x)

    _step(4, f"writing {output}")
    data_config = rebuilt.preprocessing
    if data_config:
        print(f"      preprocessing from the checkpoint's args: {data_config}")
    folder = save_pretrained(model, output, overwrite=args.overwrite, base_architecture=name,
                             base_model=args.base_model, license=args.license, repo_id=args.push_to_hub,
                             data_config=data_config or None)
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(x), reference)
    print(f"      reloaded with timm.create_model('local-dir:{folder}'): outputs "
          + ("bit-identical" if same else "DIFFER"))
    if not same:
        print("error: the written checkpoint does not reproduce the model's outputs")
        return 1
    if args.onnx:
        onnx_path = export_onnx(model, args.onnx, input_size=input_size)
        print(f"      wrote {onnx_path}: onnxruntime reproduces the model's outputs (batch dimension dynamic)")
    if args.torchscript:
        script_path = export_torchscript(model, args.torchscript, input_size=input_size)
        print(f"      wrote {script_path}: the scripted model reproduces the eager outputs")

    commit = None
    if args.push_to_hub:
        _step(5, f"pushing to {args.push_to_hub}")
        commit = push_folder_to_hub(folder, args.push_to_hub, private=args.private, revision=args.revision,
                                    create_pr=args.create_pr, commit_message=args.commit_message)
    else:
        _step(5, "pushing: skipped (no --push-to-hub)")

    macs = _macs(model, input_size)
    print("\n== export report ==")
    rows = [
        ("checkpoint", f"{args.checkpoint} [{info['key'] or 'state dict'}]"),
        ("model", f"{name} ({_kwargs_text(kwargs)})"),
        ("SCHEME", config.describe()),
        ("form", "fused (inference)" if is_fused(model) else "unfused (training, CCA kept)"),
        ("parameters", f"{params_unfused:,} -> {count_params(model):,}"),
        ("MACs / image", f"{macs:,} at {'x'.join(map(str, input_size))}" if macs is not None else "n/a"),
    ]
    if report is not None and report.eval_difference is not None:
        rows.append(("fuse check", f"max relative difference {report.eval_difference:.2e} (<= {args.tolerance:g})"))
    if report is not None:
        rows.append(("discarded by fusing", report.summary()))
        if report.above_threshold:
            shown = ", ".join(f"{n} ({report.cca_weights[n]:.3g})" for n in report.above_threshold[:4])
            rows.append(("warning", f"{len(report.above_threshold)} layer(s) discarded 1 - alpha > "
                                    f"{report.threshold}: {shown}{' ...' if len(report.above_threshold) > 4 else ''}; "
                                    "the fused model differs from the training-time function there"))
    rows.append(("reload check", "bit-identical outputs"))
    rows += [(f"  {p.name}", f"{p.stat().st_size:,} bytes") for p in sorted(folder.iterdir())]
    if args.onnx:
        rows.append(("onnx", f"{args.onnx} ({Path(args.onnx).stat().st_size:,} bytes, checked in onnxruntime)"))
    if args.torchscript:
        rows.append(("torchscript", f"{args.torchscript} ({Path(args.torchscript).stat().st_size:,} bytes, "
                                    "checked against eager)"))
    rows.append(("written", str(folder)))
    if commit is not None:
        rows.append(("pushed", commit.pr_url or commit.commit_url))
    rows.append(("load with", f"timm.create_model('{_load_name(folder, args.push_to_hub)}', pretrained=True)"))
    rows.append(("time", f"{time.perf_counter() - start:.1f}s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _check_file_options(args: argparse.Namespace) -> None:
    """Fail before the slow part: --onnx and --torchscript export the fused model, and replace a file only with
    --overwrite."""
    for flag, value in (("--onnx", args.onnx), ("--torchscript", args.torchscript)):
        if not value:
            continue
        if args.no_fuse:
            raise ValueError(f"{flag} exports the fused inference form; drop --no-fuse, or drop {flag}")
        if Path(value).exists() and not args.overwrite:
            raise FileExistsError(f"{flag} {value} already exists; pass --overwrite to replace it")


def _step(i: int, text: str) -> None:
    print(f"[{i}/{_STEPS}] {text}", flush=True)


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def _macs(model: nn.Module, input_size: Tuple[int, ...]) -> Optional[int]:
    try:
        return int(count_macs(model, input_size))
    except Exception:  # the report still goes out
        return None


def _load_name(folder: Path, repo_id: Optional[str]) -> str:
    return f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder}"


__all__ = ["add_arguments", "run"]
