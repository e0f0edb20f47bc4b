"""int8 inference of fused SCHEME models: swapping the int8 layers (``layers.int8``) into a model.

``Int8BlockDiagonalLinear`` / ``Int8BlockDiagonalConv1x1`` hold symmetric int8 weights, one scale per group and
output channel, and quantize their input at run time, one scale per token and group; each group's product is an
int8 x int8 -> int32 GEMM (``torch._int_mm``), rescaled to float. Their ``DynamicInt8...`` twins keep the same
weights and run torch.ao's dynamic int8 Linear on each group (per-call activation scales, the steps around the
GEMM fused in C++: the faster form on CPU). Two ways in, for the two quantization stacks:

    from timm_scheme.integrations.quantize import quantize_dynamic_int8, quantize_int8
    model = quantize_dynamic_int8(fused)   # torch.ao.quantization.quantize_dynamic (Dynamic...)
    quantize_int8(fused)                   # torchao.quantize_, in place

Both also quantize the model's nn.Linear layers (torch.ao's dynamic Linear, torchao's
Int8DynamicActivationInt8WeightConfig) and refuse a model whose mixers still hold their CCA branch.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from ..layers import SchemeMlp
from ..layers.int8 import (DYNAMIC_INT8_MODULES, INT8_MODULES, DynamicInt8BlockDiagonalConv1x1,
                           DynamicInt8BlockDiagonalLinear, Int8BlockDiagonalConv1x1, Int8BlockDiagonalLinear,
                           Int8SchemeMlp)
from ..mixers import scheme_mixers


def check_fused(model: nn.Module) -> None:
    """Raise ValueError naming the first SCHEME mixer that still holds its CCA branch."""
    for name, mixer in scheme_mixers(model).items():
        if mixer.has_cca:
            raise ValueError(
                f"int8 quantization: SCHEME mixer {name or type(model).__name__!r} still has its CCA branch (the "
                "model is not fused); call timm_scheme.fuse_for_inference(model) first, then quantize")


def convert_int8_mixers(model: nn.Module) -> int:
    """Make every SchemeMlp holding an int8 projection an ``Int8SchemeMlp`` (in place), so that it runs its
    int8 layers; the helpers below call it, call it yourself after your own quantize_dynamic / quantize_ with
    ``INT8_MODULES``. Returns how many mixers it converted."""
    converted = 0
    for name, mixer in scheme_mixers(model).items():
        if type(mixer) is not SchemeMlp or not any(isinstance(m, Int8BlockDiagonalLinear)
                                                   for m in (mixer.fc1, mixer.fc2)):
            continue  # converted already, or an adapted mixer (its family's forward calls the int8 layers)
        if mixer.has_cca:
            raise ValueError(f"convert_int8_mixers: {name!r} still has its CCA branch; fuse before quantizing")
        mixer.__class__ = Int8SchemeMlp  # same state, the int8-aware forward; still a SchemeMlp
        converted += 1
    return converted


def quantize_dynamic_int8(model: nn.Module, *, linear: bool = True, inplace: bool = False) -> nn.Module:
    """torch.ao route: ``torch.ao.quantization.quantize_dynamic`` with the block-diagonal layers mapped to
    ``DYNAMIC_INT8_MODULES`` (torch.ao's dynamic int8 Linear per group) and (``linear=True``) nn.Linear to
    torch.ao's dynamic int8 Linear (fbgemm/onednn, CPU only: per-tensor activation scales). Returns the quantized model, a copy unless ``inplace`` (torch.ao's
    convention). torch.ao.quantization is deprecated in favour of torchao: see ``quantize_int8``."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    from torch.ao.quantization.quantization_mappings import get_default_dynamic_quant_module_mappings

    check_fused(model)
    qconfig_spec = {kind: default_dynamic_qconfig for kind in DYNAMIC_INT8_MODULES}
    mapping = {**get_default_dynamic_quant_module_mappings(), **DYNAMIC_INT8_MODULES}
    if linear:
        qconfig_spec[nn.Linear] = default_dynamic_qconfig
    model = quantize_dynamic(model, qconfig_spec=qconfig_spec, mapping=mapping, inplace=inplace)
    convert_int8_mixers(model)
    return model


def is_block_diagonal(module: nn.Module, fqn: str = "") -> bool:
    """``filter_fn`` for torchao's ``quantize_``: the float block-diagonal layers."""
    return type(module) in INT8_MODULES


def _swap_block_diagonal(module: nn.Module, config) -> nn.Module:
    kind = INT8_MODULES.get(type(module))
    if kind is None:
        raise TypeError(f"BlockDiagonalInt8Config applies to {[t.__name__ for t in INT8_MODULES]}, got "
                        f"{type(module).__name__}: pass filter_fn=timm_scheme.integrations.quantize.is_block_diagonal")
    return kind.from_float(module)


@functools.lru_cache(maxsize=None)
def _torchao_config() -> type:
    # built on first use: importing torchao costs about half a second and logs a warning, which every
    # `import timm_scheme` would otherwise pay
    try:
        from torchao.core.config import AOBaseConfig
        from torchao.quantization.transform_module import register_quantize_module_handler
    except ImportError as err:
        raise ImportError("int8 quantization through torchao needs torchao: pip install torchao") from err

    @dataclass
    class BlockDiagonalInt8Config(AOBaseConfig):
        """torchao workflow config: swap BlockDiagonalLinear / BlockDiagonalConv1x1 for their int8 twins
        (int8 weights per group and channel, dynamic int8 activations per token and group). Use it with
        ``quantize_(model, BlockDiagonalInt8Config(), filter_fn=is_block_diagonal)``."""

    BlockDiagonalInt8Config.__module__ = __name__  # pickles by name, through the module __getattr__ below
    BlockDiagonalInt8Config.__qualname__ = "BlockDiagonalInt8Config"
    register_quantize_module_handler(BlockDiagonalInt8Config)(_swap_block_diagonal)
    return BlockDiagonalInt8Config


def __getattr__(name: str):
    if name == "BlockDiagonalInt8Config":
        return _torchao_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def quantize_int8(model: nn.Module, *, linear: bool = True) -> nn.Module:
    """torchao route, in place (``quantize_``'s convention): torchao's ``Int8DynamicActivationInt8WeightConfig``
    on the nn.Linear layers (``linear=True``; int8 weights per channel, int8 activations per token) and
    ``BlockDiagonalInt8Config`` on the block-diagonal ones. Returns ``model``.

    The nn.Linear config is made with ``set_inductor_config=False``: torchao's default would change the global
    inductor settings as a side effect of quantizing; call torchao.quantization.utils.
    recommended_inductor_config_setter() yourself before torch.compile."""
    check_fused(model)
    config = _torchao_config()()  # first: says how to install torchao when it is missing
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if linear:  # torchao's default filter: nn.Linear layers whose weight it has not quantized yet
        quantize_(model, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    quantize_(model, config, filter_fn=is_block_diagonal)
    convert_int8_mixers(model)
    return model


# BlockDiagonalInt8Config is left out: a star import would import torchao; the int8 modules are re-exported, the
# classes a quantized model holds
__all__ = [
    "Int8BlockDiagonalLinear", "Int8BlockDiagonalConv1x1", "Int8SchemeMlp",
    "quantize_dynamic_int8", "quantize_int8", "convert_int8_mixers", "check_fused", "is_block_diagonal",
    "INT8_MODULES", "DYNAMIC_INT8_MODULES", "DynamicInt8BlockDiagonalLinear", "DynamicInt8BlockDiagonalConv1x1",
]
