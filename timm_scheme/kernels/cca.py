"""Channel covariance attention as a function: per sample, A = softmax_rows(scale * K^T K) over channels (K = X,
or X with each channel L2-normalised over tokens) and output X A^T."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def covariance_attention_plain(x: torch.Tensor, scale: float, normalize: bool, channels_last: bool) -> torch.Tensor:
    """Standard ops only (traced, scripted and exported forms), logits and softmax in float32."""
    if channels_last:
        tokens = x.reshape(x.shape[0], -1, x.shape[-1]).float().transpose(1, 2)   # (B, C, N)
    else:
        tokens = x.reshape(x.shape[0], x.shape[1], -1).float()                    # (B, C, N)
    keys = F.normalize(tokens, dim=2) if normalize else tokens
    attn = torch.softmax(torch.bmm(keys, keys.transpose(1, 2)) * scale, dim=-1)
    if channels_last:
        out = torch.bmm(tokens.transpose(1, 2), attn.transpose(1, 2))              # (B, N, C)
    else:
        out = torch.bmm(attn, tokens)                                               # (B, C, N)
    return out.to(x.dtype).reshape(x.shape)


def covariance_attention(x: torch.Tensor, scale: float, normalize: bool, channels_last: bool) -> torch.Tensor:
    """Eager form: no copy of channels-last input, a hand-written backward, float32 (or float64 for float64
    input) even under autocast, since X^T X grows with the token count."""
    b = x.shape[0]
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        if channels_last:
            tokens = x.reshape(b, -1, x.shape[-1]).to(dtype).transpose(1, 2)   # (B, C, N) view
        else:
            tokens = x.reshape(b, x.shape[1], -1).to(dtype)                    # (B, C, N)
        keys = F.normalize(tokens, dim=2) if normalize else None
        out = CovarianceAttention.apply(tokens, keys, scale, channels_last)
    return out.to(x.dtype).reshape(x.shape)


def _product(a: torch.Tensor, b: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """Y = A X for channels-first X (B, C, N); for channels-last X (B, N, C), its transpose X A^T."""
    return torch.bmm(b, a.transpose(1, 2)) if channels_last else torch.bmm(a, b)


class CovarianceAttention(torch.autograd.Function):
    """ A = softmax(scale * K K^T), Y = A X, with X and K viewed channels-first (B, C, N); K = X if keys is None.

    Hand-written backward: 3 batched GEMMs (autograd's takes 4 and an extra add) and nothing saved but
    X, K and the (B, C, C) attention.
    """

    @staticmethod
    def forward(ctx, tokens, keys: Optional[torch.Tensor], scale: float, channels_last: bool):
        k = tokens if keys is None else keys
        # tokens/keys are channels-first views; for channels-last input they are transposed, which
        # bmm reads in place (a transposed operand), so no copy is made either way
        logits = torch.bmm(k, k.transpose(1, 2)).mul_(scale)
        attn = torch.softmax(logits, dim=-1)
        ctx.scale, ctx.channels_last = scale, channels_last
        ctx.save_for_backward(tokens, keys, attn)
        base = tokens.transpose(1, 2) if channels_last else tokens
        return _product(attn, base, channels_last)

    @staticmethod
    def backward(ctx, grad_out):
        # saved_tensors is read once: under non-reentrant activation checkpointing (timm's
        # set_grad_checkpointing) a second read raises "Unpack is being triggered ... already unpacked once"
        tokens, keys, attn = ctx.saved_tensors
        # a backward() called under autocast must not lower these products (attn is float32)
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            return CovarianceAttention._backward(ctx, grad_out.to(attn.dtype), tokens, keys, attn)

    @staticmethod
    def _backward(ctx, grad_out, tokens, keys, attn):
        channels_last = ctx.channels_last
        grad = grad_out.transpose(1, 2) if channels_last else grad_out   # channels-first view
        grad_attn = torch.bmm(grad, tokens.transpose(1, 2))              # dA = G X^T
        grad_logits = torch._softmax_backward_data(grad_attn, attn, -1, attn.dtype)
        sym = (grad_logits + grad_logits.transpose(1, 2)).mul_(ctx.scale)  # d(K K^T) is symmetric
        # dX = A^T G (+ M K when K is X), returned in the layout of the input (contiguous in its own view)
        grad_in = _product(attn.transpose(1, 2), grad_out, channels_last)
        k = tokens if keys is None else keys
        k_base = k.transpose(1, 2) if channels_last else k
        grad_k = _product(sym, k_base, channels_last)
        if keys is None:
            grad_in, grad_k = grad_in.add_(grad_k), None
        if channels_last:  # back to the (B, C, N) views the inputs were
            grad_in = grad_in.transpose(1, 2)
            grad_k = grad_k.transpose(1, 2) if grad_k is not None else None
        return grad_in, grad_k, None, None


# --- the forms of the CCA branch (SchemeConfig.cca_form) -------------------------------------------------------
#   "paper":        X A^T, A = softmax(scale * X^T X): the paper's definition (the kernels above)
#   "authors":      the authors' code as it runs: the key is the (C, N) tensor reshaped to (N, C), not transposed
#   "rescaled":     the paper's branch, rescaled per sample to the RMS of the block-diagonal MLP's output
#   "output":       A from the input as in the paper, applied to the block-diagonal MLP's output Y: Y A^T
#   "output_cross": the same with each channel attending to the channels of the other groups only
CCA_FORMS = ("paper", "authors", "rescaled", "output", "output_cross")


def _channels_first(t: torch.Tensor, channels_last: bool, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as (B, C, N) in ``dtype``; a view for channels-last input."""
    if channels_last:
        return t.reshape(t.shape[0], -1, t.shape[-1]).to(dtype).transpose(1, 2)
    return t.reshape(t.shape[0], t.shape[1], -1).to(dtype)


def same_group_mask(channels: int, groups: int, device: torch.device) -> torch.Tensor:
    """(C, C) True where two channels fall in the same one of ``groups`` contiguous groups."""
    group_of = torch.div(torch.arange(channels, device=device), channels // groups, rounding_mode="floor")
    return group_of[:, None] == group_of[None, :]


def channel_attention(x: torch.Tensor, form: str, scale: float, normalize: bool, channels_last: bool,
                      groups: int = 1, wide: bool = False) -> torch.Tensor:
    """The (B, C, C) channel attention of a CCA form, computed from the input ``x`` in float32 (the logits grow
    with the token count), or float64 where ``wide``."""
    dtype = torch.float64 if wide else torch.float32
    keys = _channels_first(x, channels_last, dtype)                          # (B, C, N)
    if form == "authors":
        # the (C, N) tensor read as (N, C): what `q @ k.reshape(B, -1, C)` in the authors' code multiplies by
        logits = torch.bmm(keys, keys.contiguous().reshape(keys.shape[0], -1, keys.shape[1]))
    else:
        if normalize:
            keys = F.normalize(keys, dim=2)
        logits = torch.bmm(keys, keys.transpose(1, 2))
    logits = logits * scale
    if form == "output_cross":
        logits = logits.masked_fill(same_group_mask(logits.shape[-1], groups, logits.device), float("-inf"))
    return torch.softmax(logits, dim=-1)


def apply_channel_attention(attn: torch.Tensor, t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``t`` with its channels mixed by ``attn`` (B, C, C): T A^T channels-last, A T channels-first; in ``t``'s
    layout and dtype."""
    out = torch.bmm(attn, _channels_first(t, channels_last, attn.dtype))     # (B, C, N)
    if channels_last:
        out = out.transpose(1, 2)
    return out.to(t.dtype).reshape(t.shape)


def _rms_per_sample(t: torch.Tensor, wide: bool) -> torch.Tensor:
    return t.to(torch.float64 if wide else torch.float32).pow(2).flatten(1).mean(1).add(1e-12).sqrt()


def _to_rms_of(branch: torch.Tensor, y: torch.Tensor, wide: bool) -> torch.Tensor:
    """``branch`` scaled, sample by sample, to the root mean square of ``y``."""
    factor = _rms_per_sample(y, wide) / _rms_per_sample(branch, wide)
    for _ in range(branch.dim() - 1):
        factor = factor.unsqueeze(-1)
    return branch * factor.to(branch.dtype)


def cca_branch_plain(x: torch.Tensor, y: torch.Tensor, form: str, scale: float, normalize: bool,
                     channels_last: bool, groups: int, wide: bool = False) -> torch.Tensor:
    """The CCA branch of a mixer with input ``x`` and block-diagonal MLP output ``y``, in ``y``'s dtype, in
    standard ops (what tracing, scripting and export record); computed in float32, float64 where ``wide``."""
    if form == "paper" or form == "rescaled":
        branch = covariance_attention_plain(x, scale, normalize, channels_last)
        if form == "rescaled":
            branch = _to_rms_of(branch, y, wide)
        return branch.to(y.dtype)
    attn = channel_attention(x, form, scale, normalize, channels_last, groups, wide)
    return apply_channel_attention(attn, x if form == "authors" else y, channels_last).to(y.dtype)


def cca_branch(x: torch.Tensor, y: torch.Tensor, form: str, scale: float, normalize: bool, channels_last: bool,
               groups: int) -> torch.Tensor:
    """Eager ``cca_branch_plain``: the paper's attention through its hand-written backward, and no autocast
    (float32 logits and products)."""
    wide = x.dtype == torch.float64
    with torch.autocast(device_type=x.device.type, enabled=False):
        if form == "paper" or form == "rescaled":
            branch = covariance_attention(x, scale, normalize, channels_last)
            return (_to_rms_of(branch, y, wide) if form == "rescaled" else branch).to(y.dtype)
        return cca_branch_plain(x, y, form, scale, normalize, channels_last, groups, wide)
