""" SCHEME channel mixer: block-diagonal MLP plus a channel covariance attention branch for training.
"""
import math
from typing import Optional, Tuple, Type, Union

import torch
from torch import nn

from .block_diagonal import BlockDiagonalConv1x1, BlockDiagonalLinear
from .cca import ChannelCovarianceAttention


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


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

    @property
    def has_cca(self) -> bool:
        return self.cca is not None

    def mixing_weights(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(alpha, 1 - alpha) as float32 scalars, after the annealing limit."""
        weights = torch.softmax(self.mix_logits.float(), dim=0)
        cca_weight = weights[1] * self.cca_limit.float()
        return 1.0 - cca_weight, cca_weight

    def cca_weight(self) -> float:
        """1 - alpha: how much the CCA branch contributes (0.0 once fused or without CCA)."""
        if self.cca is None:
            return 0.0
        with torch.no_grad():
            return float(self.mixing_weights()[1])

    def _glu(self, x: torch.Tensor) -> torch.Tensor:
        dim = 1 if self.use_conv else x.dim() - 1
        shape = list(x.shape)
        shape[dim:dim + 1] = [self.groups, 2, shape[dim] // (2 * self.groups)]
        first, second = x.reshape(shape).unbind(dim + 1)
        out = first * self.act(second) if self.gate_last else self.act(first) * second
        return out.flatten(dim, dim + 1)

    def bd_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The block-diagonal MLP branch alone."""
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bd_mlp(x)
        if self.cca is None:
            return y
        alpha, cca_weight = self.mixing_weights()
        use_cca = self.training or self.cca_in_eval
        if use_cca and self.cca_skip_threshold > 0 and bool(cca_weight.detach() < self.cca_skip_threshold):
            use_cca = False
        if not use_cca:
            return alpha.to(y.dtype) * y
        return alpha.to(y.dtype) * y + cca_weight.to(y.dtype) * self.cca(x)

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
