""" SCHEME channel mixer: block-diagonal MLP plus a channel covariance attention branch for training.
"""
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..schedule import CcaSchedule
from ..kernels import block_diagonal_mlp, block_diagonal_mlp_nchw, shuffle_channels
from ..kernels.dispatch import is_elementwise, nchw_on_tokens, tracing
from .block_diagonal import BlockDiagonalConv1x1, BlockDiagonalLinear
from .mixing import CcaMixing, check_mixing


_PROJECTIONS = (BlockDiagonalLinear, BlockDiagonalConv1x1)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@torch.no_grad()
def scale_affine_(module: nn.Module, factor: torch.Tensor) -> None:
    """Multiply an affine module's output by ``factor``, in place: its weight and bias (a projection, or the
    affine part of a norm in eval mode), computed in at least float32."""
    for t in (module.weight, module.bias):
        if t is not None:
            t.copy_((t.float() * factor).to(t.dtype))


def act_on_scratch(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)`` for a scratch tile of the fused kernels: without autograd, GELU / ReLU / SiLU overwrite it,
    which saves an allocation and a pass over memory (about 10% of the fused MLP on CPU)."""
    if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        kind = type(act)
        if kind is nn.GELU:
            return torch.ops.aten.gelu_(x, approximate=act.approximate)
        if kind in (nn.ReLU, nn.SiLU):
            return torch.relu_(x) if kind is nn.ReLU else F.silu(x, inplace=True)
    return act(x)


class SchemeMlp(CcaMixing):
    """ SCHEME mixer: y = alpha * BD_MLP(x) + (1 - alpha) * CCA(x) in training, alpha * BD_MLP(x) in eval;
    `cca_form` picks what CCA mixes (the input, as in the paper, or the BD-MLP's output; see `kernels.cca`).
    (alpha, 1 - alpha) = softmax(mix_logits), the CCA weight capped by `cca_schedule` as optimizer steps go by;
    `fuse()` folds alpha into fc2 and drops CCA for inference.

    NOTE: When use_conv=True, expects 2D NCHW tensors, otherwise N*C expected.
    `hidden_features` counts hidden units (fc2's input); when gated, fc1 makes a value and a gate per unit,
    packed per group as [value, gate] (gate_last) or [gate, value], so both always share a group.
    `channel_shuffle`: fc2 reads the hidden units through `kernels.shuffle_channels` (fc2 group j reads chunk j
    of every fc1 group), so the MLP mixes across groups at no extra cost in FLOPs or parameters.
    """
    def __init__(
            self,
            in_features: int,
            hidden_features: Optional[int] = None,
            out_features: Optional[int] = None,
            act_layer: Type[nn.Module] = nn.GELU,
            norm_layer: Optional[Type[nn.Module]] = None,
            bias: Union[bool, Tuple[bool, bool]] = True,
            drop: Union[float, Tuple[float, float]] = 0.,
            use_conv: bool = False,
            groups: int = 4,
            gated: bool = False,
            gate_last: bool = True,
            norm_first: bool = False,
            cca: bool = True,
            cca_scale: Optional[float] = None,
            cca_normalize: bool = False,
            cca_form: str = "paper",
            alpha_init: float = 0.5,
            cca_schedule: Optional[CcaSchedule] = None,
            channel_shuffle: bool = False,
            device=None,
            dtype=None,
    ):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias = _pair(bias)
        drop_probs = _pair(drop)
        for name, width in (('in_features', in_features), ('hidden_features', hidden_features),
                            ('out_features', out_features)):
            if width % groups:
                raise ValueError(f"SchemeMlp: groups={groups} does not divide {name}={width}")
        if channel_shuffle and hidden_features % (groups * groups):
            raise ValueError(
                f"SchemeMlp: channel_shuffle needs hidden_features={hidden_features} to be a multiple of groups**2="
                f"{groups * groups} (each fc1 group sends an equal share to every fc2 group)")
        check_mixing(type(self).__name__, in_features, out_features, cca, alpha_init)
        linear_layer = BlockDiagonalConv1x1 if use_conv else BlockDiagonalLinear
        self.use_conv = use_conv
        self.groups = groups
        self.gated = gated
        self.gate_last = gate_last
        self.norm_first = norm_first
        self.hidden_features = hidden_features
        self.channel_shuffle = channel_shuffle

        fc1_out = 2 * hidden_features if gated else hidden_features
        self.fc1 = linear_layer(in_features, fc1_out, groups, bias=bias[0], **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = linear_layer(hidden_features, out_features, groups, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop_probs[1])
        self._init_mixing(hidden_features, cca, cca_scale, cca_normalize, alpha_init, cca_schedule, device, cca_form)

    # --- the block-diagonal MLP -------------------------------------------------------------------------

    def _glu(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.use_conv else -1
        xg = x.unflatten(dim, (self.groups, 2, -1))
        pair_dim = 2 if self.use_conv else -2
        first, second = xg.select(pair_dim, 0), xg.select(pair_dim, 1)
        out = first * self.act(second) if self.gate_last else self.act(first) * second
        return out.flatten(1, 2) if self.use_conv else out.flatten(-2)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """fc2's input: fc1, then the activation (or gate), dropout and hidden norm in the order the replaced
        MLP had them."""
        x = self.fc1(x)
        if self.gated:
            x = self._glu(x)
            x = self.drop1(x)
            x = self.norm(x)
        elif self.norm_first:
            x = self.norm(x)
            x = self.act(x)
            x = self.drop1(x)
        else:
            x = self.act(x)
            x = self.drop1(x)
            x = self.norm(x)
        return x

    def fc2_input(self, x: torch.Tensor) -> torch.Tensor:
        """What fc2 reads: ``hidden(x)``, through the channel shuffle when it is on."""
        x = self.hidden(x)
        if self.channel_shuffle:
            x = shuffle_channels(x, self.groups, dim=1 if self.use_conv else -1)
        return x

    def _act_maybe_inplace(self, x: torch.Tensor) -> torch.Tensor:
        return act_on_scratch(self.act, x)

    def group_hidden(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """Hidden units of one group from its slice of fc1's output (channels on `channel_dim`): what the fused
        kernels apply between the projections. May overwrite `x` when autograd is off (a scratch tile)."""
        if not self.gated:
            return self._act_maybe_inplace(x)
        first, second = x.chunk(2, dim=channel_dim)
        if self.gate_last:
            return first * self._act_maybe_inplace(second)
        return self._act_maybe_inplace(first) * second

    def _group_hidden_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return self.group_hidden(x, channel_dim=1)

    def plain_projections(self) -> bool:
        """fc1 and fc2 are the block-diagonal layers themselves, not wrapped (e.g. by LoRA adapters, which the
        fused kernels, reading the weights directly, would skip)."""
        return type(self.fc1) in _PROJECTIONS and type(self.fc2) in _PROJECTIONS

    def fused_kernel_ok(self) -> bool:
        """The fused kernels run fc1 -> activation/gate -> fc2 per group: nothing may mix groups between
        the projections (a hidden norm) nor be random (dropout while training) nor write in place, and the
        projections must be the plain layers whose weights they read."""
        return self.plain_projections() and self.hidden_is_per_group()

    def hidden_is_per_group(self) -> bool:
        """What runs between the projections may be applied one group and one token tile at a time: no hidden
        norm mixing groups, no random numbers (dropout while training), no in-place activation."""
        if not isinstance(self.norm, nn.Identity) or not is_elementwise(self.act):
            return False
        if self.training and self.drop1.p > 0:
            return False
        return not getattr(self.act, 'inplace', False)

    def _gelu_mode(self) -> Optional[str]:
        """The `approximate` mode when the hidden function is a bare GELU (the CPU training kernel then
        calls its backward directly)."""
        return self.act.approximate if type(self.act) is nn.GELU and not self.gated else None

    def bd_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The block-diagonal MLP branch alone."""
        if tracing() or torch.jit.is_scripting() or not self.fused_kernel_ok():
            return self.drop2(self.fc2(self.fc2_input(x)))
        fc1, fc2 = self.fc1, self.fc2
        act_params = tuple(self.act.parameters())
        if self.use_conv:
            hidden_fn = self.group_hidden if nchw_on_tokens(x) else self._group_hidden_nchw
            x = block_diagonal_mlp_nchw(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, hidden_fn, act_params,
                                        recompute=self.recompute_hidden, gelu=self._gelu_mode(),
                                        shuffle=self.channel_shuffle)
        else:
            x = block_diagonal_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.group_hidden, act_params,
                                   recompute=self.recompute_hidden, gelu=self._gelu_mode(),
                                   shuffle=self.channel_shuffle)
        return self.drop2(x)

    # --- forward ------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._forward_plain(x)
        return self._forward_eager(x)

    def _forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """Standard ops only, what tracing, scripting and FX record; the last skip decision is kept."""
        return self._mix_plain(x, self.drop2(self.fc2(self.fc2_input(x))))

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            return self._forward_plain(x)
        return self._mix_eager(x, self.bd_mlp(x))

    @torch.no_grad()
    def fuse(self) -> 'SchemeMlp':
        """Inference form, in place: alpha folded into fc2, CCA and the mixing weights removed.
        Exact for the eval-mode function. Follows timm's `reparameterize_model` convention."""
        if self.cca is None:
            return self
        if not self.plain_projections():
            raise ValueError(
                f"SchemeMlp.fuse: fc2 is wrapped ({type(self.fc2).__name__}), e.g. by LoRA adapters, and folding "
                "alpha into its base weight would leave the adapter unscaled; merge the adapters first "
                "(peft_model.merge_and_unload())")
        scale_affine_(self.fc2, self.mixing_weights()[0])
        self._drop_cca()
        return self

    def extra_repr(self) -> str:
        gate = f", gated=True, gate_last={self.gate_last}" if self.gated else ""
        gate += ", channel_shuffle=True" if self.channel_shuffle else ""
        anneal = f", cca_anneal={self.cca_schedule.mode}" if self.cca is not None else ""
        return f"groups={self.groups}, hidden_features={self.hidden_features}, cca={self.has_cca}{gate}{anneal}"
