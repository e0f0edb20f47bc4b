""" A SCHEME mixer around an MLP class SCHEME does not rebuild itself (a family's own MLP, read through an
adapter): the class's own forward runs, with block-diagonal projections and resized per-unit layers inside.
"""
import inspect
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..kernels import block_diagonal_mlp, block_diagonal_mlp_nchw
from ..kernels.dispatch import is_elementwise, tracing
from ..schedule import CcaSchedule
from .block_diagonal import BlockDiagonalConv1x1
from .mixing import check_mixing
from .mlp import SchemeMlp, act_on_scratch, scale_affine_


class AdaptedSchemeMlp(SchemeMlp):
    """y = alpha * inner(x, ...) + (1 - alpha) * CCA(x) in training, alpha * inner(x, ...) in eval.

    ``inner`` is the replaced MLP module, its projections swapped for block-diagonal ones (``fc1`` and ``fc2``
    name them) and what runs per hidden unit between them resized; its forward, extra arguments included
    (e.g. PVTv2's feature size), is the family's own. ``fuse()`` folds alpha into ``output`` (fc2, or an
    affine layer after it such as LeViT's BatchNorm; ``fold(output_layer, alpha)`` where that takes more than
    scaling its weight and bias) and drops CCA.

    ``kernel_plan`` (``(pre, act, hidden_norm, output_norm)`` paths inside ``inner``, any but ``act`` may be
    None) says the forward is ``pre -> fc1 -> hidden_norm -> act -> fc2 -> output_norm`` with only dropout
    besides: then, while the norms use running statistics (BatchNorm in eval mode, folded into the projections)
    and dropout is off, SCHEME's fused block-diagonal MLP kernels run instead of the layers one by one.
    """

    # properties TorchScript must not compile (they look modules up by path)
    __jit_unused_properties__ = ["fc1", "fc2", "output_layer"]

    def __init__(self, inner: nn.Module, fc1: str, fc2: str, output: str, groups: int, *,
                 fold: Optional[Callable[[nn.Module, torch.Tensor], None]] = None, cca: bool = True,
                 cca_scale: Optional[float] = None, cca_normalize: bool = False, alpha_init: float = 0.5,
                 cca_schedule: Optional[CcaSchedule] = None, cca_form: str = "paper"):
        nn.Module.__init__(self)
        self.inner = inner
        self._paths = (fc1, fc2, output)
        self._fold = fold or scale_affine_
        first, last = inner.get_submodule(fc1), inner.get_submodule(fc2)
        in_features, out_features = first.in_features, last.out_features
        check_mixing(type(self).__name__, in_features, out_features, cca, alpha_init)
        self.use_conv = isinstance(first, (nn.Conv2d, BlockDiagonalConv1x1))  # NCHW input
        self.groups = groups
        self.hidden_features = last.in_features
        self.gated, self.gate_last, self.norm_first, self.channel_shuffle = False, True, False, False
        device = first.weight.device
        self._init_mixing(self.hidden_features, cca, cca_scale, cca_normalize, alpha_init, cca_schedule, device,
                          cca_form)
        self.kernel_plan: Optional[Tuple[Optional[str], ...]] = None

    # the projections inside `inner`, under SchemeMlp's names for code reading a mixer's projections (fusing and
    # saving checks, int8 conversion)
    @property
    def fc1(self) -> nn.Module:
        return self.inner.get_submodule(self._paths[0])

    @property
    def fc2(self) -> nn.Module:
        return self.inner.get_submodule(self._paths[1])

    @property
    def output_layer(self) -> nn.Module:
        return self.inner.get_submodule(self._paths[2])

    def _plan_module(self, index: int) -> Optional[nn.Module]:
        path = self.kernel_plan[index]
        return None if path is None else self.inner.get_submodule(path)

    def fused_kernel_ok(self) -> bool:
        """The kernel plan applies now: plain block-diagonal projections, an elementwise activation, the norms
        folded from running statistics (eval-mode BatchNorms), no dropout drawing numbers."""
        if self.kernel_plan is None or not self.plain_projections():
            return False
        act = self._plan_module(1)
        if not is_elementwise(act) or getattr(act, "inplace", False):
            return False
        norms = [n for n in (self._plan_module(2), self._plan_module(3)) if n is not None]
        if any(n.training or not n.track_running_stats for n in norms):
            return False
        return not (self.training and any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.inner.modules()))

    def _folded(self, layer: nn.Module, norm: Optional[nn.Module]):
        """A projection's (weight, bias) with the BatchNorm after it folded in (running statistics)."""
        if norm is None:
            return layer.weight, layer.bias
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps) if norm.affine else \
            torch.rsqrt(norm.running_var + norm.eps)
        shift = (norm.bias if norm.affine else 0.0) - norm.running_mean * scale
        bias = shift if layer.bias is None else layer.bias * scale + shift
        return layer.weight * scale.view(layer.weight.shape[0], -1, 1).to(layer.weight.dtype), bias.to(layer.weight.dtype)

    def _group_act(self, x: torch.Tensor) -> torch.Tensor:
        return act_on_scratch(self._plan_module(1), x)

    @torch.jit.unused
    def _fused_bd_mlp(self, x: torch.Tensor) -> torch.Tensor:
        pre, act = self._plan_module(0), self._plan_module(1)
        if pre is not None:
            x = pre(x)
        w1, b1 = self._folded(self.fc1, self._plan_module(2))
        w2, b2 = self._folded(self.fc2, self._plan_module(3))
        gelu = act.approximate if type(act) is nn.GELU else None
        kernel = block_diagonal_mlp_nchw if self.use_conv else block_diagonal_mlp
        return kernel(x, w1, b1, w2, b2, self._group_act, tuple(act.parameters()), self.recompute_hidden, gelu)

    def bd_mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._mix_plain(x, self.inner(x))
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if not tracing() and self.fused_kernel_ok():
            return self._mix_eager(x, self._fused_bd_mlp(x))
        return self._mix(x, self.inner(x))

    def _mix(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._mix_plain(x, y)
        return self._mix_recorded_or_eager(x, y)

    @torch.jit.unused
    def _mix_recorded_or_eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._mix_plain(x, y) if tracing() else self._mix_eager(x, y)

    @torch.no_grad()
    def fuse(self) -> 'AdaptedSchemeMlp':
        if self.cca is None:
            return self
        if not self.plain_projections():
            raise ValueError(
                f"AdaptedSchemeMlp.fuse: fc2 is wrapped ({type(self.fc2).__name__}), e.g. by LoRA adapters; merge "
                "the adapters first (peft_model.merge_and_unload())")
        self._fold(self.output_layer, self.mixing_weights()[0].detach())
        self._drop_cca()
        return self

    def extra_repr(self) -> str:
        anneal = f", cca_anneal={self.cca_schedule.mode}" if self.cca is not None else ""
        return (f"groups={self.groups}, hidden_features={self.hidden_features}, cca={self.has_cca}, "
                f"fc1={self._paths[0]!r}, fc2={self._paths[1]!r}, output={self._paths[2]!r}{anneal}")


class AdaptedSchemeMlpSized(AdaptedSchemeMlp):
    """For MLPs whose forward also takes the feature map's size (PVTv2's ``forward(x, feat_size)``)."""

    def bd_mlp(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        return self.inner(x, feat_size)

    def forward(self, x: torch.Tensor, feat_size: List[int]) -> torch.Tensor:
        return self._mix(x, self.inner(x, feat_size))


class AdaptedSchemeMlpAnyArgs(AdaptedSchemeMlp):
    """For MLPs whose forward takes other arguments: passed through as given (eager, traced and compiled forms;
    TorchScript cannot script a variable argument list)."""

    def bd_mlp(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.inner(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._mix(x, self.inner(x, *args, **kwargs))


def adapted_mixer_class(inner: nn.Module) -> type:
    """The AdaptedSchemeMlp form whose forward takes what ``inner``'s forward takes."""
    params = list(inspect.signature(inner.forward).parameters.values())[1:]
    if not params:
        return AdaptedSchemeMlp
    if len(params) == 1 and params[0].name in ("feat_size", "size", "hw_shape"):
        return AdaptedSchemeMlpSized
    return AdaptedSchemeMlpAnyArgs
