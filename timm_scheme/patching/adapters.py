"""Adapters: how ``scheme_patch`` reads an MLP class it does not rebuild itself (a timm family's own MLP, or one
in your own ViT code) and turns it into an :class:`~timm_scheme.layers.AdaptedSchemeMlp`.

An adapter names, inside the MLP module, the projections, the layers between them that hold state per hidden
unit (norms, depthwise or grouped convs), and the affine layer that ends the MLP::

    timm_scheme.register_mlp_adapter(MyMlp, fc1="proj_in", fc2="proj_out", hidden=("dwconv",))
    timm_scheme.register_mlp_adapter(MyGatedMlp, fc1=("gate", "up"), fc2="down")   # act(gate(x)) * up(x)

The patched mixer keeps the class's own forward (extra arguments included): the projections become
block-diagonal, the per-unit layers are resized to the new hidden width, and CCA runs beside it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..config import SchemeConfig
from .host_init import draw_layer_like, draw_like
from ..layers import AdaptedSchemeMlp, BlockDiagonalConv1x1, BlockDiagonalLinear
from ..layers.adapted import adapted_mixer_class
from .timm_mlps import SUPPORTED_MLP_TYPES


@dataclass(frozen=True)
class MlpAdapter:
    """How to read one MLP class; paths are attribute paths inside the module (``"fc1"``, ``"ln1.linear"``).

    fc1, fc2: the projections (``nn.Linear``, or ``nn.Conv2d`` 1x1 without groups), made block-diagonal. A
        gated MLP gives a tuple for fc1 (e.g. gate and value): hidden unit k of each reads the same group.
    hidden: the layers between them that hold state per hidden unit (BatchNorm, LayerNorm, GroupNorm, depthwise
        or grouped ``nn.Conv2d``; containers of them), resized to the new hidden width. Parameter-free layers
        (activations, dropout) need not be listed; anything else between the projections that mixes hidden
        units makes the class unfit for SCHEME.
    output: the affine layer that ends the MLP, into which fusing folds alpha (default: fc2), e.g. a
        BatchNorm after fc2; nothing but dropout may follow it.
    fold: ``fold(output_layer, alpha)`` multiplies the output layer's output by ``alpha`` in place, for an
        output layer that is not a plain affine one (e.g. a projection that clamps its output: scale the bounds
        too); default: its weight and bias.
    act, pre: declare the forward as ``pre -> fc1 -> [BatchNorm] -> act -> fc2 -> [BatchNorm]`` (dropout aside;
        ``pre`` optional, the BatchNorms being ``hidden`` and ``output``): the mixer then runs SCHEME's fused
        kernels while the norms use running statistics. Checked against the class's forward at patch time.
    applies: ``applies(module, name) -> bool`` for a class that is a channel MLP only in some places (e.g. an
        ``nn.Sequential`` of a given shape, or a block used as a model's FFN); where it says False the module
        is not an MLP to patch.
    """
    fc1: Union[str, Tuple[str, ...]]
    fc2: str
    hidden: Tuple[str, ...] = ()
    output: Optional[str] = None
    fold: Optional[Callable[[nn.Module, torch.Tensor], None]] = None
    act: Optional[str] = None
    pre: Optional[str] = None
    applies: Optional[Callable[[nn.Module, str], bool]] = None

    @property
    def fc1_paths(self) -> Tuple[str, ...]:
        return (self.fc1,) if isinstance(self.fc1, str) else tuple(self.fc1)

    @property
    def output_path(self) -> str:
        return self.output or self.fc2


_ADAPTERS: Dict[Type[nn.Module], List[MlpAdapter]] = {}


def register_mlp_adapter(mlp_class: Type[nn.Module], adapter: Optional[MlpAdapter] = None, *,
                         fc1: Union[str, Tuple[str, ...], None] = None, fc2: Optional[str] = None,
                         hidden: Iterable[str] = (), output: Optional[str] = None,
                         fold: Optional[Callable[[nn.Module, torch.Tensor], None]] = None,
                         act: Optional[str] = None, pre: Optional[str] = None,
                         applies: Optional[Callable[[nn.Module, str], bool]] = None) -> MlpAdapter:
    """Teach ``scheme_patch`` an MLP class: modules of exactly this type are replaced like timm's MLPs.
    Give an :class:`MlpAdapter`, or its fields as keywords. Registering a class again with the same ``applies``
    replaces that adapter; with another ``applies``, both are kept (the first that applies is used).
    Register before loading a checkpoint of a model patched this way (the loader patches the same layers)."""
    if not (isinstance(mlp_class, type) and issubclass(mlp_class, nn.Module)):
        raise TypeError(f"register_mlp_adapter: expected an nn.Module subclass, got {mlp_class!r}")
    if adapter is None:
        if fc1 is None or fc2 is None:
            raise ValueError(f"register_mlp_adapter({mlp_class.__name__}): give an MlpAdapter or both fc1= and fc2=")
        adapter = MlpAdapter(fc1=fc1, fc2=fc2, hidden=tuple(hidden), output=output, fold=fold, act=act, pre=pre,
                             applies=applies)
    elif any(v is not None for v in (fc1, fc2, output, fold, act, pre, applies)) or tuple(hidden):
        raise ValueError(f"register_mlp_adapter({mlp_class.__name__}): give an MlpAdapter or keywords, not both")
    if not adapter.fc1_paths or not all(isinstance(p, str) and p for p in (*adapter.fc1_paths, adapter.fc2)):
        raise ValueError(f"register_mlp_adapter({mlp_class.__name__}): fc1 and fc2 must be attribute paths "
                         f"(got fc1={adapter.fc1!r}, fc2={adapter.fc2!r})")
    if mlp_class in SUPPORTED_MLP_TYPES:
        raise ValueError(f"register_mlp_adapter: {mlp_class.__name__} is timm's own MLP class, which scheme_patch "
                         "rebuilds itself (with its fast kernels); no adapter needed")
    kept = [a for a in _ADAPTERS.get(mlp_class, []) if a.applies is not adapter.applies]
    _ADAPTERS[mlp_class] = kept + [adapter]
    return adapter


def unregister_mlp_adapter(mlp_class: Type[nn.Module], adapter: Optional[MlpAdapter] = None) -> None:
    """Forget ``adapter`` (the value ``register_mlp_adapter`` returned), or every adapter of ``mlp_class``."""
    kept = [a for a in _ADAPTERS.pop(mlp_class, []) if adapter is not None and a is not adapter]
    if kept:
        _ADAPTERS[mlp_class] = kept


def mlp_adapters() -> Dict[Type[nn.Module], List[MlpAdapter]]:
    """The registered adapters by class (timm's families and yours)."""
    return {kind: list(adapters) for kind, adapters in _ADAPTERS.items()}


def adapter_for(module: nn.Module, name: str = "") -> Optional[MlpAdapter]:
    """The adapter that reads ``module`` (called ``name`` in its model), or None."""
    for adapter in _ADAPTERS.get(type(module), ()):
        if adapter.applies is None or adapter.applies(module, name):
            return adapter
    return None


# --- reading ------------------------------------------------------------------------------------------------

@dataclass
class AdaptedLayout:
    """An MLP module read through its adapter: what ``scheme_patch`` checks and builds from."""
    name: str
    module: nn.Module
    adapter: MlpAdapter
    fc1: List[nn.Module]
    fc2: nn.Module

    @property
    def in_features(self) -> int:
        return _widths(self.fc1[0])[0]

    @property
    def hidden_features(self) -> int:
        return _widths(self.fc2)[0]

    @property
    def out_features(self) -> int:
        return _widths(self.fc2)[1]

    @property
    def use_conv(self) -> bool:
        return isinstance(self.fc2, nn.Conv2d)


def _widths(layer: nn.Module) -> Tuple[int, int]:
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return layer.in_features, layer.out_features


def read_adapted(name: str, module: nn.Module, adapter: MlpAdapter) -> AdaptedLayout:
    """Check ``module`` against its adapter; errors name the layer, the path and what would work."""
    kind = type(module).__name__

    def get(path: str, role: str) -> nn.Module:
        try:
            return module.get_submodule(path)
        except AttributeError:
            raise ValueError(f"scheme_patch: the adapter of {kind} names {role}={path!r}, which layer '{name}' "
                             "does not have; fix the adapter's paths (register_mlp_adapter)") from None

    fc1, fc2 = [get(path, "fc1") for path in adapter.fc1_paths], get(adapter.fc2, "fc2")
    for path, layer in [*zip(adapter.fc1_paths, fc1), (adapter.fc2, fc2)]:
        plain = type(layer) is nn.Linear or (type(layer) is nn.Conv2d and layer.kernel_size == (1, 1)
                                             and layer.groups == 1 and layer.stride == (1, 1)
                                             and layer.padding in ((0, 0), "valid"))
        if not plain:
            raise ValueError(f"scheme_patch: the projection {path!r} of layer '{name}' is {type(layer).__name__}; "
                             "a projection must be nn.Linear or a 1x1 nn.Conv2d without groups, stride or padding")
    for layer in fc1:
        if type(layer) is not type(fc2):
            raise ValueError(f"scheme_patch: layer '{name}' mixes {type(layer).__name__} and {type(fc2).__name__} "
                             "projections; all must be nn.Linear or all 1x1 nn.Conv2d")
    for path, layer in zip(adapter.fc1_paths, fc1):
        if _widths(layer) != (_widths(fc1[0])[0], _widths(fc2)[0]):
            raise ValueError(f"scheme_patch: {path!r} of layer '{name}' maps {_widths(layer)[0]} -> "
                             f"{_widths(layer)[1]} channels, but fc2 reads {_widths(fc2)[0]} hidden units; SCHEME "
                             "adapts MLPs whose fc2 reads fc1's units one to one")
    for path in adapter.hidden:
        parent_path, _, leaf = path.rpartition(".")
        parent = get(parent_path, "hidden") if parent_path else module
        if not (hasattr(parent, leaf) and getattr(parent, leaf) is None):  # None: a layer built without it
            get(path, "hidden")
    _check_undeclared(name, module, adapter, _widths(fc2)[0], (_widths(fc1[0])[0], _widths(fc2)[1]))
    output = get(adapter.output_path, "output")
    if adapter.fold is None and not _is_affine(output, _widths(fc2)[1]):
        raise ValueError(f"scheme_patch: output={adapter.output_path!r} of layer '{name}' is "
                         f"{type(output).__name__}; fusing folds alpha into an affine layer of width "
                         f"{_widths(fc2)[1]} (fc2, or an affine BatchNorm / LayerNorm after it), or the adapter's "
                         "fold function multiplies its output")
    return AdaptedLayout(name=name, module=module, adapter=adapter, fc1=fc1, fc2=fc2)


def _check_undeclared(name: str, module: nn.Module, adapter: MlpAdapter, hidden: int, outer: Tuple[int, int]) -> None:
    """A layer holding state of the hidden width that the adapter does not list would keep its old width (and
    fail at the first forward): name it now. Only decidable where the hidden width differs from the outer ones."""
    if hidden in outer:
        return
    listed = (*adapter.fc1_paths, adapter.fc2, *adapter.hidden)
    for path, leaf in module.named_modules():
        if any(path == p or path.startswith(p + ".") for p in listed):
            continue
        own = [t for _, t in (*leaf.named_parameters(recurse=False), *leaf.named_buffers(recurse=False))
               if t is not None]
        if any(t.dim() >= 1 and t.shape[0] == hidden for t in own):
            raise ValueError(f"scheme_patch: layer '{name}', {path} is {type(leaf).__name__} with state of the hidden "
                             f"width {hidden}, which the adapter of {type(module).__name__} does not list in hidden=; "
                             "list it there (or, if it mixes hidden units, the MLP cannot be made block-diagonal)")


def optional_submodule(module: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at ``path``, or None where it is set to None (a layer the module was built without, e.g.
    visformer's conv2 without its spatial conv); ``read_adapted`` has checked the path."""
    for part in path.split("."):
        module = getattr(module, part)
        if module is None:
            return None
    return module


def _is_affine(layer: nn.Module, width: int) -> bool:
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return True
    if isinstance(layer, _BatchNorm):
        return layer.affine and layer.num_features == width
    if isinstance(layer, nn.LayerNorm):
        return layer.elementwise_affine and tuple(layer.normalized_shape) == (width,)
    return False


# --- building -----------------------------------------------------------------------------------------------

def build_adapted(spec: AdaptedLayout, hidden: int, config: SchemeConfig) -> AdaptedSchemeMlp:
    """The SCHEME mixer for ``spec``: a copy of the module with block-diagonal projections (drawn like the ones
    they replace) and its per-unit layers resized to ``hidden`` units (drawn like theirs)."""
    adapter, groups = spec.adapter, config.groups
    inner = copy.deepcopy(spec.module)
    kind = BlockDiagonalConv1x1 if spec.use_conv else BlockDiagonalLinear
    projections = [(path, old, (spec.in_features, hidden)) for path, old in zip(adapter.fc1_paths, spec.fc1)]
    for path, old, (n_in, n_out) in projections + [(adapter.fc2, spec.fc2, (hidden, spec.out_features))]:
        new = kind(n_in, n_out, groups, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
        draw_layer_like(new, [old])
        inner.set_submodule(path, new)
    _keep_reparameterization_off_projections(inner)
    for path in adapter.hidden:
        module = optional_submodule(inner, path)
        for leaf_name, leaf in (module.named_modules() if module is not None else ()):
            where = f"layer '{spec.name}', {path}{'.' + leaf_name if leaf_name else ''}"
            _resize_per_unit(leaf, spec.hidden_features, hidden, groups, where)
    mixer = adapted_mixer_class(inner)(
        inner, adapter.fc1_paths[0], adapter.fc2, adapter.output_path, groups, fold=adapter.fold,
        cca=config.cca and spec.in_features == spec.out_features,
        cca_scale=config.cca_scale(hidden),
        cca_normalize=config.cca_scale_mode == "normalized",
        cca_form=config.cca_form,
        alpha_init=config.alpha_init,
        cca_schedule=config.schedule())
    mixer.cca_skip_threshold = config.cca_skip_threshold
    mixer.kernel_plan = _kernel_plan(spec, mixer)
    mixer.train(spec.module.training)
    return mixer


def _kernel_plan(spec: AdaptedLayout, mixer: AdaptedSchemeMlp) -> Optional[Tuple[Optional[str], ...]]:
    """(pre, act, hidden norm, output norm) when the adapter declares the kernel's structure and this module
    has it (one projection, no layer between the projections but an optional BatchNorm); else None."""
    adapter, inner = spec.adapter, mixer.inner
    if adapter.act is None or len(spec.fc1) != 1 or adapter.fold is not None:
        return None
    present = [p for p in adapter.hidden if optional_submodule(inner, p) is not None
               and not isinstance(optional_submodule(inner, p), nn.Identity)]
    if len(present) > 1 or any(not isinstance(inner.get_submodule(p), _BatchNorm) for p in present):
        return None  # e.g. a depthwise conv between the projections: the family's forward runs
    output = adapter.output if adapter.output not in (None, adapter.fc2) else None
    if output is not None and not isinstance(inner.get_submodule(output), _BatchNorm):
        return None
    plan = (adapter.pre, adapter.act, present[0] if present else None, output)
    _check_plan(spec, mixer, plan)
    return plan


@torch.no_grad()
def _check_plan(spec: AdaptedLayout, mixer: AdaptedSchemeMlp, plan: Tuple[Optional[str], ...]) -> None:
    """The declared structure computes what the class's forward computes: compared on a copy in eval mode with
    random norm statistics (so every folded term counts); a wrong declaration is an error naming the layer."""
    if any(t.is_meta for t in mixer.parameters()):
        return
    probe = copy.deepcopy(mixer).eval()
    probe.kernel_plan = plan
    for module in probe.inner.modules():
        if isinstance(module, _BatchNorm) and module.affine:
            module.weight.uniform_(0.5, 1.5)
            module.bias.normal_(0, 0.1)
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    width = spec.in_features
    x = torch.randn((2, width, 3, 3) if spec.use_conv else (2, 5, width), device=spec.fc2.weight.device,
                    dtype=spec.fc2.weight.dtype)
    if not probe.fused_kernel_ok():
        return
    want, got = probe.inner(x), probe._fused_bd_mlp(x)
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
        raise ValueError(
            f"scheme_patch: the adapter of {type(spec.module).__name__} declares act={spec.adapter.act!r}, "
            f"pre={spec.adapter.pre!r} (pre -> fc1 -> norm -> act -> fc2 -> norm), which does not compute what "
            f"layer '{spec.name}''s forward computes; fix or drop act= / pre= (register_mlp_adapter)")


_REPARAM_METHODS = ("fuse", "reparameterize", "switch_to_deploy")


def _keep_reparameterization_off_projections(inner: nn.Module) -> None:
    """timm's ``reparameterize_model`` replaces every child that has ``fuse()`` (LeViT's LinearNorm, the Conv+BN
    pairs of EfficientViT-MSRA, SHViT, iFormer) by what it returns, a dense layer built from the weights; on a
    block-diagonal projection that breaks. Such containers become a subclass whose ``fuse()`` returns them as
    they are (same function, same state) and whose in-place reparameterizations do nothing."""
    projections = (BlockDiagonalLinear, BlockDiagonalConv1x1)
    for module in list(inner.modules()):
        if any(callable(getattr(module, m, None)) for m in _REPARAM_METHODS) and \
                any(isinstance(d, projections) for d in module.modules()):
            module.__class__ = _kept_as_is(type(module))


_KEPT_CLASSES: Dict[type, type] = {}


def _kept_as_is(kind: type) -> type:
    if kind in _KEPT_CLASSES.values():
        return kind
    if kind not in _KEPT_CLASSES:
        name = f"{kind.__module__.replace('.', '_')}_{kind.__qualname__.replace('.', '_')}_BlockDiagonal"
        kept = type(name, (kind,), {m: _returns_self for m in _REPARAM_METHODS if hasattr(kind, m)})
        kept.__module__, kept.__qualname__ = __name__, name
        globals()[name] = kept  # picklable by name once timm_scheme is imported
        _KEPT_CLASSES[kind] = kept
    return _KEPT_CLASSES[kind]


def _returns_self(self):
    return self


def _resize_per_unit(leaf: nn.Module, old: int, new: int, groups: int, where: str) -> None:
    """Give ``leaf`` (a layer between the projections) ``new`` hidden units, in place; a clear error when it
    holds state that is not per hidden unit."""
    own = list(leaf.named_parameters(recurse=False)) + list(leaf.named_buffers(recurse=False))
    if not own:
        return
    if isinstance(leaf, _BatchNorm) and leaf.num_features == old:
        leaf.num_features = new
        _resize_tensors(leaf, new, (new,))
    elif isinstance(leaf, nn.LayerNorm) and tuple(leaf.normalized_shape) == (old,):
        leaf.normalized_shape = (new,)
        _resize_tensors(leaf, new, (new,))
    elif isinstance(leaf, nn.GroupNorm) and leaf.num_channels == old and new % leaf.num_groups == 0:
        leaf.num_channels = new
        _resize_tensors(leaf, new, (new,))
    elif isinstance(leaf, nn.Conv2d) and leaf.in_channels == leaf.out_channels == old and leaf.groups > 1:
        conv_groups = new if leaf.groups == old else leaf.groups  # depthwise stays depthwise
        if conv_groups % groups or new % conv_groups:
            raise ValueError(
                f"scheme_patch: {where} is a grouped conv with {leaf.groups} groups over {old} hidden units: with "
                f"{new} units its groups would cross SCHEME's groups={groups}; use a groups value dividing "
                f"{leaf.groups}")
        leaf.in_channels = leaf.out_channels = new
        leaf.groups = conv_groups
        _resize_tensors(leaf, new, (new, new // conv_groups, *leaf.kernel_size))
    else:
        raise ValueError(
            f"scheme_patch: {where} is {type(leaf).__name__} with state that is not per hidden unit (or not "
            f"{old} wide); SCHEME can resize norms and depthwise or grouped convs between the projections. "
            "If it mixes hidden units across groups, this MLP cannot be made block-diagonal")


@torch.no_grad()
def _resize_tensors(leaf: nn.Module, new: int, weight_shape: Tuple[int, ...]) -> None:
    """Replace a per-unit layer's tensors by ``new``-unit ones: parameters drawn like the old ones, running
    statistics reset (mean 0, variance 1)."""
    for name, param in list(leaf.named_parameters(recurse=False)):
        shape = weight_shape if name == "weight" else (new,)
        fresh = torch.empty(shape, device=param.device, dtype=param.dtype)
        draw_like(fresh, [param])
        setattr(leaf, name, nn.Parameter(fresh, requires_grad=param.requires_grad))
    for name, buf in list(leaf.named_buffers(recurse=False)):
        if buf is None or buf.dim() == 0:
            continue  # num_batches_tracked
        fill = 1.0 if name == "running_var" else 0.0
        setattr(leaf, name, torch.full((new,), fill, device=buf.device, dtype=buf.dtype))
