""" SCHEME channel mixer: block-diagonal MLP plus a channel covariance attention branch for training.
"""
import math
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from .block_diagonal import (
    BlockDiagonalConv1x1, BlockDiagonalLinear, block_diagonal_mlp, block_diagonal_mlp_nchw, nchw_on_tokens)
from .cca import ChannelCovarianceAttention

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch builds without distributed support
    DTensor = None

# activations that mix channels or draw random numbers: the fused kernels apply the activation one
# group and one token tile at a time (and recompute it in backward), so these take the layered path
_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.RReLU, nn.MultiheadAttention)
_ELEMENTWISE_MODULES = ('torch.nn.modules.activation', 'timm.layers.activations')
_ELEMENTWISE_TYPES = ('timm.models.metaformer.StarReLU',)


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _is_sharded(t: Optional[torch.Tensor]) -> bool:
    """A parameter split across ranks (a DTensor, as FSDP2's fully_shard leaves it between forwards)."""
    return DTensor is not None and isinstance(t, DTensor)


def _is_elementwise(act: nn.Module) -> bool:
    """A known activation type that maps every element on its own (scalar parameters at most)."""
    if isinstance(act, _NOT_ELEMENTWISE):
        return False
    kind = type(act)
    if not (isinstance(act, nn.Identity) or kind.__module__.startswith(_ELEMENTWISE_MODULES)
            or f"{kind.__module__}.{kind.__qualname__}" in _ELEMENTWISE_TYPES):
        return False
    return all(t.numel() <= 1 for t in (*act.parameters(), *act.buffers()))


class SchemeMlp(nn.Module):
    """ SCHEME mixer: y = alpha * BD_MLP(x) + (1 - alpha) * CCA(x) in training, alpha * BD_MLP(x) in eval.
    (alpha, 1 - alpha) = softmax(mix_logits); `fuse()` folds alpha into fc2 and drops CCA for inference.

    NOTE: When use_conv=True, expects 2D NCHW tensors, otherwise N*C expected.
    `hidden_features` counts hidden units (fc2's input); when gated, fc1 makes a value and a gate per unit,
    packed per group as [value, gate] (gate_last) or [gate, value], so both always share a group.
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
            alpha_init: float = 0.5,
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
        if cca and in_features != out_features:
            raise ValueError(
                f"SchemeMlp: CCA needs in_features == out_features (got {in_features} -> {out_features}); "
                "pass cca=False for this layer")
        if not 0.0 < alpha_init < 1.0:
            raise ValueError(f"SchemeMlp: alpha_init={alpha_init} must lie strictly between 0 and 1")
        linear_layer = BlockDiagonalConv1x1 if use_conv else BlockDiagonalLinear
        self.use_conv = use_conv
        self.groups = groups
        self.gated = gated
        self.gate_last = gate_last
        self.norm_first = norm_first
        self.hidden_features = hidden_features

        fc1_out = 2 * hidden_features if gated else hidden_features
        self.fc1 = linear_layer(in_features, fc1_out, groups, bias=bias[0], **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm_layer(hidden_features, **dd) if norm_layer is not None else nn.Identity()
        self.fc2 = linear_layer(hidden_features, out_features, groups, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop_probs[1])

        if cca:
            scale = hidden_features ** -0.5 if cca_scale is None else cca_scale
            self.cca = ChannelCovarianceAttention(scale, normalize=cca_normalize, channels_last=not use_conv)
            # logits of (alpha, 1 - alpha); kept 1-D so timm's optimizer factories exempt them from weight decay
            logits = torch.tensor([math.log(alpha_init), math.log(1.0 - alpha_init)], device=device)
            self.mix_logits = nn.Parameter(logits)
            # multiplies the CCA weight: 1 = free, annealed to 0 to force CCA out by the end of training
            self.register_buffer('cca_limit', torch.ones((), device=device))
        else:
            self.cca = None
            self.register_parameter('mix_logits', None)
            self.register_buffer('cca_limit', None)
        self.cca_skip_threshold = 0.0
        self.cca_in_eval = False  # set by fuse_for_inference to measure what fusing discards
        # the last skip decision, a plain bool so torch.compile reads it without a host sync
        self._cca_skipped = False
        # training on CPU: recompute each hidden tile in backward instead of keeping the (tokens, hidden)
        # activations; saves most of the mixer's activation memory for a few % more step time
        self.recompute_hidden = False

    @property
    def has_cca(self) -> bool:
        return self.cca is not None

    def mixing_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha, 1 - alpha) as scalars of at least float32, after the annealing limit."""
        dtype = torch.promote_types(self.mix_logits.dtype, torch.float32)
        weights = torch.softmax(self.mix_logits.to(dtype), dim=0)
        cca_weight = weights[1] * self.cca_limit.to(dtype)
        return 1.0 - cca_weight, cca_weight

    def cca_weight(self, learnt: bool = False) -> float:
        """1 - alpha: how much the CCA branch contributes (0.0 once fused or without CCA).
        ``learnt=True`` gives the value the mixing logits hold, before the annealing limit."""
        if self.cca is None:
            return 0.0
        with torch.no_grad():
            if learnt:
                return float(torch.softmax(self.mix_logits.float(), dim=0)[1])
            return float(self.mixing_weights()[1])

    def _glu(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.use_conv else x.dim() - 1
        shape = list(x.shape)
        shape[dim:dim + 1] = [self.groups, 2, shape[dim] // (2 * self.groups)]
        first, second = x.reshape(shape).unbind(dim + 1)
        out = first * self.act(second) if self.gate_last else self.act(first) * second
        return out.flatten(dim, dim + 1)

    def _act_maybe_inplace(self, x: torch.Tensor) -> torch.Tensor:
        # without autograd the fused kernels hand over a scratch tile: overwriting it saves an allocation
        # and a pass over memory (about 10% of the fused MLP on CPU)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            kind = type(self.act)
            if kind is nn.GELU:
                return torch.ops.aten.gelu_(x, approximate=self.act.approximate)
            if kind in (nn.ReLU, nn.SiLU):
                return torch.relu_(x) if kind is nn.ReLU else F.silu(x, inplace=True)
        return self.act(x)

    def _group_hidden(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        """Hidden units of one group from its slice of fc1's output (channels on `channel_dim`).
        May overwrite `x` when autograd is off (the fused kernels pass a scratch tile)."""
        if not self.gated:
            return self._act_maybe_inplace(x)
        first, second = x.chunk(2, dim=channel_dim)
        if self.gate_last:
            return first * self._act_maybe_inplace(second)
        return self._act_maybe_inplace(first) * second

    def _group_hidden_nchw(self, x: torch.Tensor) -> torch.Tensor:
        return self._group_hidden(x, channel_dim=1)

    def _fused_kernel_ok(self) -> bool:
        """The fused kernels run fc1 -> activation/gate -> fc2 per group: nothing may mix groups between
        the projections (a hidden norm) nor be random (dropout while training) nor write in place."""
        if not isinstance(self.norm, nn.Identity) or not _is_elementwise(self.act):
            return False
        if self.training and self.drop1.p > 0:
            return False
        return not getattr(self.act, 'inplace', False)

    def bd_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The block-diagonal MLP branch alone."""
        if self._fused_kernel_ok():
            fc1, fc2 = self.fc1, self.fc2
            act_params = tuple(self.act.parameters())
            if self.use_conv:
                hidden_fn = self._group_hidden if nchw_on_tokens(x) else self._group_hidden_nchw
                x = block_diagonal_mlp_nchw(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, hidden_fn, act_params,
                                            recompute=self.recompute_hidden)
            else:
                x = block_diagonal_mlp(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self._group_hidden, act_params,
                                       recompute=self.recompute_hidden)
            return self.drop2(x)
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
        x = self.fc2(x)
        x = self.drop2(x)
        return x

    def update_cca_skip(self) -> bool:
        """Decide from the mixing weights (identical on every rank) whether training skips the CCA branch.
        Eager forwards decide on every call; a torch.compile'd forward reuses the last decision (no host
        sync, no graph break), which `train()` and this method refresh. Returns the decision."""
        if self.cca is None or self.cca_skip_threshold <= 0:
            self._cca_skipped = False
        else:
            with torch.no_grad():
                self._cca_skipped = bool(self.mixing_weights()[1] < self.cca_skip_threshold)
        return self._cca_skipped

    def train(self, mode: bool = True) -> 'SchemeMlp':
        super().train(mode)
        # FSDP2 shards the logits between forwards: reading them here would be a collective that a rank calling
        # train() alone would hang in, so the next eager forward decides instead (with the logits gathered)
        if mode and not _is_sharded(self.mix_logits):
            self.update_cca_skip()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bd_mlp(x)
        if self.cca is None:
            return y
        alpha, cca_weight = self.mixing_weights()
        use_cca = self.training or self.cca_in_eval
        if use_cca and self.cca_skip_threshold > 0:
            use_cca = not (self._cca_skipped if torch.compiler.is_compiling() else self.update_cca_skip())
        if not use_cca:
            return alpha.to(y.dtype) * y
        # alpha = 1 - cca_weight, so this is alpha * y + cca_weight * CCA(x) in one fused pass (and a
        # cheaper backward than two scalings and an add)
        return torch.lerp(y, self.cca(x).to(y.dtype), cca_weight.to(y.dtype))

    @torch.no_grad()
    def fuse(self) -> 'SchemeMlp':
        """Inference form, in place: alpha folded into fc2, CCA and the mixing weights removed.
        Exact for the eval-mode function. Follows timm's `reparameterize_model` convention."""
        if self.cca is None:
            return self
        alpha = self.mixing_weights()[0]
        self.fc2.weight.copy_((self.fc2.weight.float() * alpha).to(self.fc2.weight.dtype))
        if self.fc2.bias is not None:
            self.fc2.bias.copy_((self.fc2.bias.float() * alpha).to(self.fc2.bias.dtype))
        self.cca = None
        self.mix_logits = None
        self.cca_limit = None
        return self

    def extra_repr(self) -> str:
        gate = f", gated=True, gate_last={self.gate_last}" if self.gated else ""
        return f"groups={self.groups}, hidden_features={self.hidden_features}, cca={self.has_cca}{gate}"
