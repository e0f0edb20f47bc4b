"""Small, fast instances of the timm architectures the plugin must support."""
from typing import Sequence, Union

import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

# name -> (create_model kwargs, input image size): pretrained=False, small images keep them quick
ARCHITECTURES = {
    "deit_tiny_patch16_224": (dict(img_size=32, patch_size=8), 32),
    "vit_small_patch16_224": (dict(img_size=32, patch_size=8), 32),
    "swin_tiny_patch4_window7_224": (dict(img_size=56, window_size=7), 56),
    "swinv2_tiny_window8_256": (dict(img_size=64, window_size=8), 64),
    "poolformer_s12": ({}, 32),
    "poolformerv2_s12": ({}, 32),
    "convformer_s18": ({}, 32),
    "caformer_s18": ({}, 64),
    "eva02_tiny_patch14_224": (dict(img_size=56), 56),  # GluMlp (SwiGLUPacked)
    "eva02_tiny_patch14_224.swiglu": (dict(img_size=56, scale_mlp=True), 56),  # SwiGLU with hidden LayerNorm
    "mobilevitv2_050": ({}, 64),  # ConvMlp
}


def create(key: str, **extra) -> timm.models.VisionTransformer:
    kwargs, _ = ARCHITECTURES[key]
    return timm.create_model(key.split(".")[0], pretrained=False, **{"num_classes": 10, **kwargs, **extra})


def example_input(key: str, batch: int = 2) -> torch.Tensor:
    size = ARCHITECTURES[key][1]
    return torch.randn(batch, 3, size, size)


def shallow(model: nn.Module, keep: Union[int, Sequence[int]] = 2) -> nn.Module:
    """Keep the first `keep` blocks of every stage (each `blocks` Sequential, in order; one count for all or
    one per stage): the same block types and stage structure, a fraction of the graph to trace (export and
    compile time grow with the depth)."""
    stages = [m for name, m in model.named_modules()
              if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, nn.Sequential)]
    counts = [keep] * len(stages) if isinstance(keep, int) else list(keep)
    if len(counts) != len(stages):
        raise ValueError(f"shallow: keep={keep} gives {len(counts)} counts for {len(stages)} stages")
    for blocks, count in zip(stages, counts):
        del blocks[count:]
    return model


def timm_fx_model(model: nn.Module, train: bool = False) -> nn.Module:
    """timm's FX model of its tests (``_create_fx_model`` of timm's tests/test_models.py): torchvision's feature
    extraction with timm's leaf modules and functions, returning the nodes that feed the graph's output."""
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        outputs = [n.name for n in nodes[0]._input_nodes.keys()]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n)] for n in outputs]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)
