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
