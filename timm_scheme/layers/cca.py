""" Channel covariance attention (CCA): a parameter-free channel mixer used by SCHEME in training.
"""
import torch
import torch.nn.functional as F
from torch import nn


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
        b = x.shape[0]
        # logits and softmax in float32 even under autocast: X^T X grows with the token count
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.channels_last:
                tokens = x.reshape(b, -1, x.shape[-1]).float()          # (B, N, C)
                keys = F.normalize(tokens, dim=1) if self.normalize else tokens
                attn = torch.softmax(torch.bmm(keys.transpose(1, 2), keys) * self.scale, dim=-1)
                out = torch.bmm(tokens, attn.transpose(1, 2))           # (B, N, C)
            else:
                tokens = x.reshape(b, x.shape[1], -1).float()           # (B, C, N)
                keys = F.normalize(tokens, dim=2) if self.normalize else tokens
                attn = torch.softmax(torch.bmm(keys, keys.transpose(1, 2)) * self.scale, dim=-1)
                out = torch.bmm(attn, tokens)                           # (B, C, N)
        return out.to(x.dtype).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"scale={self.scale:.4g}, normalize={self.normalize}, channels_last={self.channels_last}"
