"""SCHEME models under the ways they get trained and run: gradient checkpointing, channels_last, bf16 / fp16
autocast and torch.compile of whole models; property tests of the layers against dense references; CCA at
large token counts and extreme inputs.

References are independent of the kernels: dense matmuls with an explicit block mask, a dense recomputation of
the whole mixer, a per-sample loop for CCA, and the same model run the plain way (contiguous, float32, eager,
no checkpointing).
"""
from __future__ import annotations

import copy
import warnings
from typing import Dict, List, Optional
from unittest import mock

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
import torch.utils.checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import timm_scheme.kernels.mlp as bd_mlp
from timm_scheme import (BlockDiagonalConv1x1, BlockDiagonalLinear, ChannelCovarianceAttention, SchemeMlp,
                         fuse_for_inference, scheme_mixers)

from .scenarios import AUTOCAST_TOLERANCE, batch, loss_and_grads, patched_shallow, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

# hypothesis: few, small examples; the reference (float64, per-sample loops) sets the pace, not the deadline
PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# --- whole models ------------------------------------------------------------------------------------------

def assert_same_grads(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], **tolerance) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m: f"{name}: {m}", **tolerance)


def count_mixer_calls(model: nn.Module) -> List[int]:
    calls = [0]
    for mixer in scheme_mixers(model).values():
        # a pre-hook: checkpoint recomputation may stop inside a forward once it has what backward needs
        mixer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("recompute_hidden", [False, True])
@pytest.mark.parametrize("key", ["deit_tiny_patch16_224", "swin_tiny_patch4_window7_224"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(key, recompute_hidden):
    model = patched_shallow(key)
    for mixer in scheme_mixers(model).values():
        mixer.recompute_hidden = recompute_hidden  # also the custom autograd Function inside a checkpoint
    images, labels = batch(key)
    _, loss, grads = loss_and_grads(model, images, labels)

    model.set_grad_checkpointing(True)
    calls = count_mixer_calls(model)
    _, loss_ckpt, grads_ckpt = loss_and_grads(model, images, labels)
    assert calls[0] == 2 * len(scheme_mixers(model))  # each mixer ran again in backward: checkpointing is on
    torch.testing.assert_close(loss_ckpt, loss)
    assert_same_grads(grads_ckpt, grads)


@pytest.mark.parametrize("channels_last", [True, False])
def test_cca_backward_under_non_reentrant_checkpoint(channels_last):
    """Non-reentrant checkpointing (timm's default) lets a backward read its saved tensors only once."""
    cca = ChannelCovarianceAttention(0.25, channels_last=channels_last)
    x = torch.randn(2, 5, 6, requires_grad=True)
    (want,) = torch.autograd.grad(cca(x).square().sum(), x)
    out = torch.utils.checkpoint.checkpoint(cca, x, use_reentrant=False)
    (got,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("form", ["train", "fused"])
@pytest.mark.parametrize("key", ["poolformer_s12", "caformer_s18"])
def test_channels_last_gives_the_same_output_and_gradients(key, form):
    model = patched_shallow(key, keep=1)
    if form == "fused":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the discarded CCA weight of an untrained model
            fuse_for_inference(model.eval())
    images, labels = batch(key)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images_cl = images.contiguous(memory_format=torch.channels_last)
    assert not images_cl.is_contiguous() and model_cl.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)
    if form == "fused":  # inference: no autograd, the hand-tiled CPU kernels
        with torch.no_grad():
            torch.testing.assert_close(model_cl(images_cl), model(images), rtol=1e-5, atol=1e-5)
        return
    logits, loss, grads = loss_and_grads(model, images, labels)
    logits_cl, loss_cl, grads_cl = loss_and_grads(model_cl, images_cl, labels)
    torch.testing.assert_close(logits_cl, logits, rtol=1e-5, atol=1e-5)
    assert_same_grads(grads_cl, grads, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("key", ["deit_tiny_patch16_224", "caformer_s18"])
def test_autocast_training_step_is_finite_and_close_to_float32(key, dtype):
    """fp16 autocast on CPU as well as bf16. No GradScaler: these models have no tiny layer scale to underflow
    fp16 gradients (PoolFormer's 1e-5 does: there fp16 training needs a GradScaler, as anywhere)."""
    model = patched_shallow(key, keep=1)
    images, labels = batch(key)
    logits, loss, grads = loss_and_grads(model, images, labels)
    with torch.autocast("cpu", dtype=dtype):
        logits_low, loss_low, grads_low = loss_and_grads(model, images, labels)
    assert logits_low.dtype == dtype
    assert torch.isfinite(logits_low).all() and torch.isfinite(loss_low)
    assert all(torch.isfinite(g).all() for g in grads_low.values())
    logits_bound, grads_bound, mix_bound = AUTOCAST_TOLERANCE[dtype]
    assert relative_error(logits_low, logits) < logits_bound
    for name in [n for n in grads if n.endswith(("fc1.weight", "fc2.weight"))] + ["input"]:
        assert relative_error(grads_low[name], grads[name]) < grads_bound, name
    for name in [n for n in grads if n.endswith("mix_logits")]:
        assert relative_error(grads_low[name], grads[name]) < mix_bound, name


@pytest.mark.parametrize("key,form", [("deit_tiny_patch16_224", "train"), ("caformer_s18", "fused")])
def test_whole_model_under_torch_compile_matches_eager(key, form):
    """test_compile.py checks single mixers; here a whole patched timm model, traced by aot_eager (forward and
    backward through timm's blocks and both SCHEME layouts, without inductor's C++ build)."""
    dynamo.reset()
    model = patched_shallow(key, keep=1)
    images, labels = batch(key)
    compiled = torch.compile(model, backend="aot_eager")
    if form == "train":
        logits, loss, grads = loss_and_grads(model, images, labels)
        logits_c, loss_c, grads_c = loss_and_grads(compiled, images, labels)
        torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)
        assert_same_grads(grads_c, grads, rtol=1e-4, atol=1e-5)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            fuse_for_inference(model.eval())
        with torch.no_grad():
            torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
    dynamo.reset()


# --- property tests of the layers against dense references ------------------------------------------------

def masked_dense(weight: torch.Tensor) -> torch.Tensor:
    """(groups, out_g, in_g) blocks -> the dense (groups*out_g, groups*in_g) matrix: every entry gathered from its
    row's block, then an explicit block mask zeroes the off-diagonal blocks (differentiable, no block_diag)."""
    groups, out_g, in_g = weight.shape
    rows = torch.arange(groups * out_g)[:, None]
    cols = torch.arange(groups * in_g)[None, :]
    mask = rows // out_g == cols // in_g
    return weight[rows // out_g, rows % out_g, cols % in_g] * mask


def leaf(t: Optional[torch.Tensor], dtype=torch.float64) -> Optional[torch.Tensor]:
    return None if t is None else t.detach().to(dtype).requires_grad_()


def check_against_reference(out, ref, inputs, ref_inputs, *, grad: bool, rtol: float, atol: float) -> None:
    """Outputs close; with ``grad``, also the gradients of a random projection of the output."""
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=atol)
    if not grad:
        return
    upstream = torch.randn(out.shape, dtype=torch.float64)
    live = [i for i, t in enumerate(inputs) if t is not None]
    got = torch.autograd.grad(out, [inputs[i] for i in live], upstream.to(out.dtype))
    want = torch.autograd.grad(ref, [ref_inputs[i] for i in live], upstream)
    for i, a, b in zip(live, got, want):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=atol, msg=lambda m: f"gradient {i}: {m}")


TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-6, atol=1e-7)}
dtypes = st.sampled_from([torch.float32, torch.float64])


@PROPERTY
@given(groups=st.integers(1, 4), in_g=st.integers(1, 5), out_g=st.integers(1, 5), bias=st.booleans(),
       lead=st.lists(st.integers(1, 5), min_size=1, max_size=3), grad=st.booleans(), dtype=dtypes,
       seed=st.integers(0, 2 ** 16))
def test_block_diagonal_linear_property(groups, in_g, out_g, bias, lead, grad, dtype, seed):
    torch.manual_seed(seed)
    layer = BlockDiagonalLinear(groups * in_g, groups * out_g, groups, bias=bias, dtype=dtype)
    x = torch.randn(*lead, groups * in_g, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):  # without autograd: the write-into-slices kernel
        out = layer(x)
    ref_x, ref_w, ref_b = leaf(x), leaf(layer.weight), leaf(layer.bias)
    ref = ref_x @ masked_dense(ref_w).T + (ref_b if bias else 0)
    check_against_reference(out, ref, [x, layer.weight, layer.bias], [ref_x, ref_w, ref_b], grad=grad,
                            **TOLERANCE[dtype])


@PROPERTY
@given(groups=st.integers(1, 4), in_g=st.integers(1, 5), out_g=st.integers(1, 5), bias=st.booleans(),
       shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)), grad=st.booleans(), dtype=dtypes,
       seed=st.integers(0, 2 ** 16))
def test_block_diagonal_conv1x1_property(groups, in_g, out_g, bias, shape, grad, dtype, seed):
    torch.manual_seed(seed)
    layer = BlockDiagonalConv1x1(groups * in_g, groups * out_g, groups, bias=bias, dtype=dtype)
    b, h, w = shape
    x = torch.randn(b, groups * in_g, h, w, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        out = layer(x)
    ref_x, ref_w, ref_b = leaf(x), leaf(layer.weight), leaf(layer.bias)
    ref = torch.einsum("oc,bchw->bohw", masked_dense(ref_w), ref_x)
    if bias:
        ref = ref + ref_b.view(1, -1, 1, 1)
    check_against_reference(out, ref, [x, layer.weight, layer.bias], [ref_x, ref_w, ref_b], grad=grad,
                            **TOLERANCE[dtype])


ACTIVATIONS = {"gelu": (nn.GELU, F.gelu), "silu": (nn.SiLU, F.silu), "relu": (nn.ReLU, F.relu)}


def naive_cca(tokens: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, N, C): per sample, A = softmax_rows(scale * X^T X), out = X A^T, straight from the definition."""
    outs = []
    for sample in tokens:
        logits = scale * sample.T @ sample
        attn = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        outs.append(sample @ (attn / attn.sum(dim=1, keepdim=True)).T)
    return torch.stack(outs)


def to_tokens(x: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """(B, C, H, W) or (B, H, W, C) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2) if channels_first else x.reshape(x.shape[0], -1, x.shape[-1])


def from_tokens(tokens: torch.Tensor, shape: torch.Size, channels_first: bool) -> torch.Tensor:
    if channels_first:
        return tokens.transpose(1, 2).reshape(shape)
    return tokens.reshape(shape)


def dense_mixer(x, w1, b1, w2, b2, mix_logits, act, *, groups, gated, gate_last, cca_scale=None):
    """The whole SCHEME mixer recomputed densely on channels-last (B, N, C) input; alpha from ``mix_logits``
    (None: no mixing), CCA added when ``cca_scale`` is given."""
    pre = x @ masked_dense(w1).T + (b1 if b1 is not None else 0)
    if gated:  # per group, fc1's block holds [first half | second half] of that group's units
        first, second = pre.unflatten(-1, (groups, 2, -1)).unbind(-2)
        hidden = (first * act(second) if gate_last else act(first) * second).flatten(-2)
    else:
        hidden = act(pre)
    y = hidden @ masked_dense(w2).T + (b2 if b2 is not None else 0)
    if mix_logits is None:
        return y
    alpha = torch.softmax(mix_logits, 0)[0]
    y = alpha * y
    return y if cca_scale is None else y + (1 - alpha) * naive_cca(x, cca_scale)


@PROPERTY
@given(groups=st.sampled_from([1, 2, 4]), in_g=st.integers(1, 4), hidden_g=st.integers(1, 6), gated=st.booleans(),
       gate_last=st.booleans(), use_conv=st.booleans(), act=st.sampled_from(sorted(ACTIVATIONS)), cca=st.booleans(),
       form=st.sampled_from(["train", "eval", "fused"]), grad=st.booleans(), recompute=st.booleans(),
       small_tiles=st.booleans(), shape=st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12)),
       dtype=dtypes, seed=st.integers(0, 2 ** 16))
def test_scheme_mlp_property(groups, in_g, hidden_g, gated, gate_last, use_conv, act, cca, form, grad, recompute,
                             small_tiles, shape, dtype, seed):
    torch.manual_seed(seed)
    channels = groups * in_g
    act_layer, act_fn = ACTIVATIONS[act]
    mlp = SchemeMlp(channels, groups * hidden_g, groups=groups, gated=gated, gate_last=gate_last, act_layer=act_layer,
                    use_conv=use_conv, cca=cca, dtype=dtype).train(form == "train")
    mlp.recompute_hidden = recompute
    if cca:
        with torch.no_grad():
            mlp.mix_logits.copy_(torch.randn(2))
    b, h, w = shape
    x = torch.randn(b, channels, h, w, dtype=dtype) if use_conv else torch.randn(b, h, w, channels, dtype=dtype)
    params = [mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, mlp.mix_logits]
    refs = [leaf(x)] + [leaf(p) for p in params]
    ref = dense_mixer(to_tokens(refs[0], use_conv), *refs[1:], act_fn, groups=groups, gated=gated,
                      gate_last=gate_last, cca_scale=mlp.cca.scale if cca and form == "train" else None)
    ref = from_tokens(ref, x.shape, use_conv)
    if form == "fused":
        mlp.fuse()
    x.requires_grad_(grad)
    tile_bytes = 1 if small_tiles else bd_mlp.TILE_BYTES_PER_THREAD  # 64-token tiles: up to 3 tiles per call
    with mock.patch.object(bd_mlp, "TILE_BYTES_PER_THREAD", tile_bytes), torch.set_grad_enabled(grad):
        out = mlp(x)
    if form == "fused":  # fc2 now holds alpha * W2, and the logits are gone: only the input's gradient compares
        params = [None] * len(params)
    check_against_reference(out, ref, [x] + params, refs, grad=grad, **TOLERANCE[dtype])


# --- CCA: large token counts and extreme inputs -----------------------------------------------------------

def extreme_tokens(kind: str, tokens: int = 56 * 56, channels: int = 16) -> torch.Tensor:
    """(1, tokens, channels) inputs that push X^T X to its limits."""
    generator = torch.Generator().manual_seed(0)
    if kind == "scale_1e4":
        return torch.randn(1, tokens, channels, generator=generator) * 1e4
    if kind == "constant_channels":  # each channel one value for all tokens: X^T X has rank 1
        return (torch.randn(channels, generator=generator) * 1e4).expand(1, tokens, channels).clone()
    if kind == "zeros":
        return torch.zeros(1, tokens, channels)
    if kind == "one_token_spike":  # one huge token among small ones
        x = torch.randn(1, tokens, channels, generator=generator) * 1e-3
        x[0, 17] = 1e4
        return x
    raise ValueError(kind)


def assert_convex_mix(out: torch.Tensor, tokens: torch.Tensor, rtol: float) -> None:
    """Every output channel of a token lies between that token's smallest and largest input channel."""
    slack = rtol * tokens.abs().amax().clamp_min(1e-30)
    low, high = tokens.amin(-1, keepdim=True), tokens.amax(-1, keepdim=True)
    assert (out >= low - slack).all() and (out <= high + slack).all()


# test_layers.py covers 3136 random tokens at 1e3 scale in float32, channels-last; these add 1e4 scale,
# degenerate inputs, the NCHW layout, bf16 autocast, the convex-mix property and the whole mixer
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["tokens", "nchw"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kind", ["scale_1e4", "constant_channels", "zeros", "one_token_spike"])
def test_cca_finite_and_convex_at_3136_tokens_and_extreme_inputs(kind, normalize, channels_last, precision):
    tokens = extreme_tokens(kind)
    x = tokens if channels_last else tokens.transpose(1, 2).reshape(1, 16, 56, 56)
    if precision == "bf16":
        x = x.bfloat16()
    x = x.clone().requires_grad_()
    cca = ChannelCovarianceAttention(64 ** -0.5, normalize=normalize, channels_last=channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = cca(x)
    assert out.dtype == x.dtype and torch.isfinite(out).all()
    (grad,) = torch.autograd.grad(out, x, torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    assert torch.isfinite(grad).all()
    assert_convex_mix(to_tokens(out.float(), not channels_last), to_tokens(x.detach().float(), not channels_last),
                      rtol=1e-2 if precision == "bf16" else 1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("use_conv", [False, True])
def test_scheme_mixer_trains_at_3136_tokens_with_1e4_inputs(use_conv, precision):
    torch.manual_seed(0)
    mlp = SchemeMlp(16, 64, groups=4, use_conv=use_conv).train()
    tokens = extreme_tokens("scale_1e4")
    x = (tokens.transpose(1, 2).reshape(1, 16, 56, 56) if use_conv else tokens).clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = mlp(x)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in mlp.parameters())
