""" Channel covariance attention (CCA): a parameter-free channel mixer used by SCHEME in training.
"""
import torch
from torch import nn

from ..kernels import covariance_attention, covariance_attention_plain
from ..kernels.dispatch import tracing


class ChannelCovarianceAttention(nn.Module):
    """ Per sample, A = softmax_rows(scale * X^T X) over channels, output X A^T (every output channel a
    convex mix of all input channels). Dim 0 is the batch; every dim but the channel one holds tokens.
    """
    def __init__(
            self,
            scale: float,
            normalize: bool = False,
            channels_last: bool = True,
    ):
        super().__init__()
        self.scale = float(scale)
        self.normalize = normalize
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return covariance_attention_plain(x, self.scale, self.normalize, self.channels_last)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if tracing():
            return covariance_attention_plain(x, self.scale, self.normalize, self.channels_last)
        return covariance_attention(x, self.scale, self.normalize, self.channels_last)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, normalize={self.normalize}, channels_last={self.channels_last}"
