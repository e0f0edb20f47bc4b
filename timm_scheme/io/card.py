"""The README.md model card of a saved SCHEME model: Hub metadata in YAML front matter, then what the
model is, what it costs, what fusing discarded and how to load it."""
from __future__ import annotations

from typing import List, Optional, Sequence

from huggingface_hub import ModelCardData
from torch import nn

from ..mixers import cca_weights, scheme_mixers
from ..stats import count_macs, count_params
from .format import CONFIG_NAME, ENTRYPOINT, FORMAT_VERSION, WEIGHTS_NAME, CheckpointSpec

PAPER_URL = "https://arxiv.org/abs/2312.00412"


def model_card(
        model: nn.Module,
        spec: CheckpointSpec,
        *,
        name: str,
        input_size: Sequence[int],
        repo_id: Optional[str] = None,
        base_model: Optional[str] = None,
        license: Optional[str] = None,
) -> str:
    from ..version import __version__

    tags = ["image-classification", "timm", "scheme", "timm-scheme", "fused" if spec.fused else "unfused"]
    data = ModelCardData(library_name="timm", pipeline_tag="image-classification", tags=tags,
                         license=license, base_model=base_model)
    macs = _macs(model, input_size)
    size = " x ".join(str(s) for s in input_size)
    if not spec.config.cca:
        form = "block-diagonal MLP without CCA (cca=False): training and inference form are the same, nothing to fuse"
    elif spec.fused:
        form = "fused for inference: CCA removed, alpha folded into fc2"
    else:
        form = "unfused training form: CCA branches and mixing logits kept; fine-tune it, or fuse it before deployment"
    lines = [
        "---", data.to_yaml(), "---",
        f"# Model card for {name}",
        "",
        f"`{spec.base_architecture}` with its channel-mixer MLPs replaced by SCHEME mixers (block-diagonal MLP "
        f"plus channel covariance attention, [SCHEME, arXiv 2312.00412]({PAPER_URL})), saved with timm-scheme "
        f"{__version__}. Form: **{form}**.",
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        f"| Base architecture | `{spec.base_architecture}` |",
    ]
    if base_model:
        lines.append(f"| Initialised from | `{base_model}` |")
    lines += [
        f"| Classes | {getattr(model, 'num_classes', 'n/a')} |",
        f"| Input size | {size} |",
        f"| Parameters | {count_params(model):,} |",
        f"| MACs per image | {f'{macs:,}' if macs is not None else 'n/a'} (inference function at {size}) |",
        f"| SCHEME mixers | {len(scheme_mixers(model))} |",
        f"| Checkpoint format | timm Hub layout, `{CONFIG_NAME}` architecture `{ENTRYPOINT}`, "
        f"SCHEME format version {FORMAT_VERSION} |",
        "",
        "### SCHEME config",
        "",
        "| option | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | `{v}` |" for k, v in spec.config.to_dict().items()]
    if spec.modules is not None:
        why = "a filter or `skip_unfit`" if spec.config.skip_unfit else "a filter"
        lines += ["", f"Patched MLPs ({why} left the others dense): {', '.join(f'`{m}`' for m in spec.modules)}"]
    lines += ["", "## Fuse report", ""] + _fuse_section(model, spec)
    lines += ["", "## Usage", ""] + _usage(spec, repo_id=repo_id, name=name)
    return "\n".join(lines) + "\n"


def _macs(model: nn.Module, input_size: Sequence[int]) -> Optional[int]:
    try:
        return int(count_macs(model, tuple(input_size)))
    except Exception:  # a model that needs other inputs still gets a card
        return None


def _fuse_section(model: nn.Module, spec: CheckpointSpec) -> List[str]:
    if not spec.fused:
        weights = cca_weights(model)
        if not weights:
            return ["Not fused; no layer has a CCA branch."]
        worst = max(weights, key=weights.get)
        return [
            "Not fused. An unfused SCHEME model in `eval()` already computes the fused function; fusing discards "
            "`(1 - alpha) * CCA(x)` per layer. Current CCA weights (1 - alpha): "
            f"mean {sum(weights.values()) / len(weights):.4g}, largest {weights[worst]:.4g} (`{worst}`).",
        ]
    report = getattr(model, "scheme_fuse_report", None)
    if report is None or not report.cca_weights:
        return ["Fused before saving; no report of what fusing discarded was kept with the model."]
    lines = [f"{report.summary()}.", ""]
    if report.above_threshold:
        lines += [f"**Warning:** {len(report.above_threshold)} layer(s) discarded a CCA weight above "
                  f"{report.threshold}: the fused model differs from the training-time function there.", ""]
    lines += ["| layer | discarded CCA weight (1 - alpha) |", "|---|---|"]
    lines += [f"| `{n}` | {w:.4g} |" for n, w in report.cca_weights.items()]
    return lines


def _usage(spec: CheckpointSpec, *, repo_id: Optional[str], name: str) -> List[str]:
    source = f"hf-hub:{repo_id}" if repo_id else f"local-dir:path/to/{name}"
    lines = [
        "```python",
        "import timm",
        f"import timm_scheme  # registers the '{ENTRYPOINT}' architecture with timm",
        "",
        f'model = timm.create_model("{source}", pretrained=True).eval()',
        "data_config = timm.data.resolve_data_config(model=model)",
        "transform = timm.data.create_transform(**data_config)",
        "",
        "# a new classifier for fine-tuning, or a feature backbone",
        f'finetune = timm.create_model("{source}", pretrained=True, num_classes=37)',
        f'backbone = timm.create_model("{source}", pretrained=True, features_only=True)',
    ]
    if not spec.fused:
        lines += ["", "# before deployment: drop CCA, fold alpha into fc2 (exact for the eval-mode function)",
                  "timm_scheme.fuse_for_inference(model)"]
    lines += ["```", "", f"Files: `{CONFIG_NAME}`, `{WEIGHTS_NAME}` (safetensors, no pickle), `README.md`."]
    return lines
