"""``timm-scheme export``: a training checkpoint of a SCHEME model -> a fused, verified timm checkpoint folder
(``config.json`` + ``model.safetensors`` + ``README.md``), optionally pushed to the Hugging Face Hub.

    timm-scheme export --model deit_tiny_patch16_224 --groups 4 --expansion 8 \\
        --checkpoint output/train/model_best.pth.tar --output out/scheme-deit-tiny [--push-to-hub org/name] \\
        [--onnx out/scheme-deit-tiny.onnx] [--torchscript out/scheme-deit-tiny.pt]

The checkpoint is read with ``torch.load(weights_only=True)``: timm's train-script format (a dict with
``state_dict`` / ``state_dict_ema``, its ``args`` allowed), a bare state dict, or a ``.safetensors`` file.
Model arguments not given on the command line are taken from the checkpoint's ``args`` when it has them.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import timm
import torch
from timm.models._input import get_model_input_config
from torch import nn

from .config import CCA_SCALE_MODES, INIT_MODES, SchemeConfig
from .fuse import fuse_for_inference, max_relative_difference, scheme_mixers
from .io import save_pretrained
from .io.format import CheckpointFormatError
from .io.hub import push_folder_to_hub
from .io.artifacts import ExportVerificationError
from .io.onnx import export_onnx
from .io.torchscript import export_torchscript
from .io.weights import check_state_dict, read_training_checkpoint
from .patch import is_patched, patch_structure
from .stats import count_macs, count_params

_logger = logging.getLogger(__name__)
_STEPS = 5
_CHOICES = {"cca_scale_mode": CCA_SCALE_MODES, "init": INIT_MODES}


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
    model.add_argument("--model-kwargs", nargs="*", default=None, action=_ParseKwargs, metavar="KEY=VALUE",
                       help="other timm.create_model arguments, e.g. patch_size=8")
    scheme = parser.add_argument_group("SCHEME options the model was patched with (defaults: SchemeConfig's)")
    for field in dataclasses.fields(SchemeConfig):
        _add_option(scheme, field)
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
            ExportVerificationError) as e:
        print(f"error: {e}")
        return 2


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    output = Path(args.output)
    if output.exists() and not args.overwrite:  # fail before the slow part; save_pretrained checks it again
        raise FileExistsError(f"--output {output} already exists; pass --overwrite to replace it")
    _check_file_options(args)

    _step(1, f"reading {args.checkpoint} (torch.load weights_only=True)")
    state_dict, info = read_training_checkpoint(args.checkpoint, use_ema=args.use_ema)
    train_args = info.get("args") or {}
    print(f"      {len(state_dict)} tensors from {repr(info['key']) if info['key'] else 'a bare state dict'}"
          + "".join(f", {k} {info[k]}" for k in ("epoch", "metric") if info.get(k) is not None))

    name, kwargs, config, origin = _model_options(args, train_args, state_dict)
    _step(2, f"building {name} ({_kwargs_text(kwargs)}) with SCHEME {_config_text(config)}")
    for text in origin:
        print(f"      {text}")
    model, already_fused = _build(name, kwargs, config, state_dict, args.checkpoint)
    model.eval()
    params_unfused = count_params(model)

    generator = torch.Generator().manual_seed(args.seed)
    input_size = tuple(get_model_input_config(model)["input_size"])
    x = torch.randn(args.batch_size, *input_size, generator=generator)
    with torch.no_grad():
        reference = model(x)

    report, max_rel = None, 0.0
    if args.no_fuse or already_fused:
        _step(3, "checking the model" + (" (already fused in the checkpoint)" if already_fused else
                                         " (--no-fuse: exporting the unfused training form)"))
    else:
        _step(3, f"fusing and checking against the unfused eval output on {args.batch_size} random inputs")
        fuse_for_inference(model, x)
        report = model.scheme_fuse_report
        with torch.no_grad():
            fused = model(x)
        max_rel = max_relative_difference(reference, fused)
        print(f"      max |fused - unfused| / max |unfused| = {max_rel:.2e} (tolerance {args.tolerance:g})")
        if not max_rel <= args.tolerance:
            print(f"error: the fused model differs from the unfused one by {max_rel:.2e} > {args.tolerance:g}; "
                  "nothing was written")
            return 1
        reference = fused

    _step(4, f"writing {output}")
    folder = save_pretrained(model, output, overwrite=args.overwrite, base_architecture=name,
                             base_model=args.base_model, license=args.license, repo_id=args.push_to_hub)
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
        ("SCHEME", _config_text(config)),
        ("form", "fused (inference)" if model_is_fused(model) else "unfused (training, CCA kept)"),
        ("parameters", f"{params_unfused:,} -> {count_params(model):,}"),
        ("MACs / image", f"{macs:,} at {'x'.join(map(str, input_size))}" if macs is not None else "n/a"),
    ]
    if report is not None:
        rows.append(("fuse check", f"max relative difference {max_rel:.2e} (<= {args.tolerance:g})"))
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


def model_is_fused(model: nn.Module) -> bool:
    return not any(m.has_cca for m in scheme_mixers(model).values())


def _build(name: str, kwargs: Dict[str, Any], config: SchemeConfig, state_dict: Dict[str, torch.Tensor],
           checkpoint: str) -> Tuple[nn.Module, bool]:
    """The patched model the checkpoint was trained as, with its weights; and whether they were already fused."""
    model = timm.create_model(name, pretrained=False, **kwargs)
    if not is_patched(model):
        patch_structure(model, config)
    has_logits = any(k.endswith("mix_logits") for k in state_dict)
    already_fused = not has_logits and any(m.has_cca for m in scheme_mixers(model).values())
    if already_fused:  # e.g. an earlier export: build the inference form it holds
        for mixer in scheme_mixers(model).values():
            mixer.fuse()
    check_state_dict(state_dict, model, source=checkpoint,
                     what=f"{name} patched with the given SCHEME options ({_config_text(config)})",
                     arguments_hint="--img-size, --num-classes, --in-chans and --model-kwargs KEY=VALUE")
    model.load_state_dict(state_dict, strict=True)
    return model, already_fused


def _model_options(args: argparse.Namespace, train_args: Dict[str, Any], state_dict: Dict[str, torch.Tensor]
                   ) -> Tuple[str, Dict[str, Any], SchemeConfig, List[str]]:
    """Model name, create_model kwargs and SCHEME config: the command line first, then the checkpoint's args."""
    origin: List[str] = []
    name = args.model or train_args.get("model")
    if not name:
        raise ValueError("--model is required: the checkpoint does not record the timm model it was trained as")
    if not timm.is_model(name):
        raise ValueError(f"--model {name!r} is not a timm model name (see timm.list_models())")
    if not args.model:
        origin.append(f"model {name!r} from the checkpoint's args")

    kwargs: Dict[str, Any] = {}
    saved_kwargs = train_args.get("model_kwargs")
    if args.model_kwargs is not None:
        kwargs.update(args.model_kwargs)
    elif isinstance(saved_kwargs, dict) and saved_kwargs:
        kwargs.update(saved_kwargs)
        origin.append(f"model kwargs {saved_kwargs} from the checkpoint's args")
    for key in ("num_classes", "img_size", "in_chans"):
        value = getattr(args, key)
        if value is None and train_args.get(key) is not None:
            value = train_args[key]
            origin.append(f"{key}={value} from the checkpoint's args")
        if value is not None:
            kwargs.setdefault(key, value)
    if "num_classes" not in kwargs:
        classes = _classes_in(name, state_dict)
        if classes is not None:
            kwargs["num_classes"] = classes
            origin.append(f"num_classes={classes} from the classifier weights")

    options: Dict[str, Any] = {}
    saved = {k: v for k, v in train_args.items() if k in {f.name for f in dataclasses.fields(SchemeConfig)}}
    saved.update(train_args.get("scheme_options") or {})
    if train_args.get("no_cca"):
        saved["cca"] = False
    for field in dataclasses.fields(SchemeConfig):
        value = getattr(args, field.name)
        if value is not None:
            options[field.name] = None if value == "none" else value
        elif field.name in saved:
            options[field.name] = saved[field.name]
            origin.append(f"{field.name}={saved[field.name]!r} from the checkpoint's args")
    return name, kwargs, SchemeConfig.from_dict(options), origin


def _classes_in(name: str, state_dict: Dict[str, torch.Tensor]) -> Optional[int]:
    cfg = timm.models.get_pretrained_cfg(name)
    classifier = cfg.classifier if cfg is not None else None
    for head in ([classifier] if isinstance(classifier, str) else list(classifier or [])):
        weight = state_dict.get(f"{head}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _add_option(group: argparse._ArgumentGroup, field: dataclasses.Field) -> None:
    flag = "--" + field.name.replace("_", "-")
    default = field.default
    if isinstance(default, bool):
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {default})")
    elif field.name == "expansion":
        group.add_argument(flag, type=_float_or_none, default=None, metavar="E",
                           help=f"hidden units per input channel, or 'none' for each layer's width (default {default:g})")
    elif default is None:  # alpha_init: its default depends on init
        group.add_argument(flag, type=float, default=None, help="(default: SchemeConfig's for the init)")
    else:
        group.add_argument(flag, type=type(default), default=None, choices=_CHOICES.get(field.name),
                           help=f"(default {default})")


def _float_or_none(text: str) -> Any:
    return "none" if text.lower() == "none" else float(text)


class _ParseKwargs(argparse.Action):
    """KEY=VALUE pairs, values read as Python literals when they are (as timm's train script does)."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep or not key:
                parser.error(f"{option_string}: expected KEY=VALUE, got {item!r}")
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)


def _step(i: int, text: str) -> None:
    print(f"[{i}/{_STEPS}] {text}", flush=True)


def _kwargs_text(kwargs: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"


def _config_text(config: SchemeConfig) -> str:
    defaults = SchemeConfig()
    changed = [f"{k}={v}" for k, v in config.to_dict().items()
               if k in ("groups", "expansion") or v != getattr(defaults, k)]
    return ", ".join(changed)


def _macs(model: nn.Module, input_size: Tuple[int, ...]) -> Optional[int]:
    try:
        return int(count_macs(model, input_size))
    except Exception:  # the report still goes out
        return None


def _load_name(folder: Path, repo_id: Optional[str]) -> str:
    return f"hf-hub:{repo_id}" if repo_id else f"local-dir:{folder}"


__all__ = ["add_arguments", "run"]
