""" Channel covariance attention (CCA): a parameter-free channel mixer used by SCHEME in training.
"""
from typing import Optional

import torch
from torch import nn

from ..kernels import CCA_FORMS, cca_branch, cca_branch_plain, channel_attention
from ..kernels.dispatch import tracing


class ChannelCovarianceAttention(nn.Module):
    """ Per sample, a channel attention A (C x C) from the input X (N x C), mixing the channels of X or of the
    block-diagonal MLP's output Y by `form` (see `kernels.cca`); "paper": A = softmax_rows(scale * X^T X), X A^T.
    Dim 0 is the batch; every dim but the channel one holds tokens.
    """
    def __init__(
            self,
            scale: float,
            normalize: bool = False,
            channels_last: bool = True,
            form: str = "paper",
            groups: int = 1,
    ):
        super().__init__()
        if form not in CCA_FORMS:
            raise ValueError(f"ChannelCovarianceAttention: form={form!r}, expected one of {CCA_FORMS}")
        if form == "output_cross" and groups < 2:
            raise ValueError(f"ChannelCovarianceAttention: form='output_cross' attends to the channels of the other "
                             f"groups and needs groups >= 2 (got groups={groups})")
        self.scale = float(scale)
        self.normalize = normalize
        self.channels_last = channels_last
        self.form = form
        self.groups = groups

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The branch for input `x` and block-diagonal MLP output `y` (needed by the forms that read it), in `y`'s
        dtype."""
        if y is None:
            if self.form != "paper" and self.form != "authors":
                raise ValueError("ChannelCovarianceAttention(form='" + self.form + "') reads the block-diagonal MLP's "
                                 "output: call it as cca(x, y)")
            y = x
        if torch.jit.is_scripting():
            return cca_branch_plain(x, y, self.form, self.scale, self.normalize, self.channels_last, self.groups)
        return self._forward_eager(x, y)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        run = cca_branch_plain if tracing() else cca_branch
        return run(x, y, self.form, self.scale, self.normalize, self.channels_last, self.groups)

    @torch.jit.unused
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C, C) channel attention this branch computes from `x` (float32), for diagnostics."""
        return channel_attention(x, self.form, self.scale, self.normalize, self.channels_last, self.groups,
                                 wide=x.dtype == torch.float64)

    def extra_repr(self) -> str:
        return (f"form={self.form}, scale={self.scale:.4g}, normalize={self.normalize}, "
                f"channels_last={self.channels_last}")
