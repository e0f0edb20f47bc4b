"""Every kernel variant of the block-diagonal layers, the fused SCHEME MLP and CCA against dense references:
forward and backward in float32, gradcheck in float64 on tiny sizes."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from timm.models.metaformer import StarReLU

import timm_scheme.kernels.block_diagonal as bd
import timm_scheme.kernels.cca as cca_mod
import timm_scheme.kernels.mlp as bd_mlp
from timm_scheme.kernels import dispatch
from timm_scheme.layers import ChannelCovarianceAttention, SchemeMlp
from timm_scheme.kernels.dispatch import is_elementwise as _is_elementwise


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 64 tokens, so a few hundred tokens cover several tiles and a remainder."""
    monkeypatch.setattr(bd_mlp, "TILE_BYTES_PER_THREAD", 1)


def dense(weight: torch.Tensor) -> torch.Tensor:
    return torch.block_diag(*weight.unbind(0))


def params(groups, out_f, in_f, dtype=torch.float32, bias=True):
    w = torch.randn(groups, out_f // groups, in_f // groups, dtype=dtype, requires_grad=True)
    b = torch.randn(out_f, dtype=dtype, requires_grad=True) if bias else None
    return w, b


def grads(out, inputs, grad_out):
    live = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, live, grad_out)


def assert_close_all(got, want, **tol):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **tol)


# --- block-diagonal linear / conv ------------------------------------------------------------------------

LINEAR_KERNELS = {
    "dispatch": bd.block_diagonal_linear,
    "per_group": lambda x, w, b: bd.linear_per_group(x, w, b, w.shape[0], w.shape[2], w.shape[1]),
    "batched": bd.linear_batched,
}


@pytest.mark.parametrize("kernel", sorted(LINEAR_KERNELS))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("groups,in_f,out_f", [(4, 16, 32), (2, 12, 6), (1, 8, 8)])
def test_linear_kernels_match_dense_forward_and_backward(kernel, bias, groups, in_f, out_f):
    torch.manual_seed(0)
    w, b = params(groups, out_f, in_f, bias=bias)
    x = torch.randn(3, 7, in_f, requires_grad=True)
    y = LINEAR_KERNELS[kernel](x, w, b)
    ref = F.linear(x, dense(w), b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    assert_close_all(grads(y, (x, w, b), g), grads(ref, (x, w, b), g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_into_slices_matches_dense_without_autograd(bias):
    torch.manual_seed(0)
    w, b = params(4, 32, 16, bias=bias)
    x = torch.randn(5, 9, 16)
    with torch.no_grad():
        torch.testing.assert_close(bd.linear_into_slices(x, w, b), F.linear(x, dense(w), b), rtol=1e-5, atol=1e-5)
        # the dispatcher takes that path without autograd, on a non-contiguous input too
        xt = torch.randn(9, 5, 16).transpose(0, 1)
        torch.testing.assert_close(bd.block_diagonal_linear(xt, w, b), F.linear(xt, dense(w), b),
                                   rtol=1e-5, atol=1e-5)


def test_linear_gradcheck_float64():
    torch.manual_seed(0)
    w, b = params(3, 6, 9, dtype=torch.float64)
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    for kernel in LINEAR_KERNELS.values():
        assert torch.autograd.gradcheck(kernel, (x, w, b))


@pytest.mark.parametrize("bias", [True, False])
def test_conv1x1_matches_dense_conv(bias):
    torch.manual_seed(0)
    w, b = params(4, 32, 16, bias=bias)
    x = torch.randn(2, 16, 5, 3, requires_grad=True)
    y = bd.block_diagonal_conv1x1(x, w, b)
    ref = F.conv2d(x, dense(w)[:, :, None, None], b)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    assert_close_all(grads(y, (x, w, b), g), grads(ref, (x, w, b), g), rtol=1e-5, atol=1e-5)
    w64, b64 = params(2, 4, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(bd.block_diagonal_conv1x1,
                                    (torch.randn(2, 6, 2, 3, dtype=torch.float64, requires_grad=True), w64, b64))


# --- fused block-diagonal MLP ----------------------------------------------------------------------------

def reference_mlp(x, w1, b1, w2, b2, act, gated=False, gate_last=True, groups=1, channels_dim=-1):
    """Dense recomputation: block_diag weights, GLU packed [value, gate] per group."""
    if channels_dim == 1:
        h = F.conv2d(x, dense(w1)[:, :, None, None], b1)
    else:
        h = F.linear(x, dense(w1), b1)
    if gated:
        shape = list(h.shape)
        d = channels_dim % h.dim()
        shape[d:d + 1] = [groups, 2, shape[d] // (2 * groups)]
        first, second = h.reshape(shape).unbind(d + 1)
        h = (first * act(second) if gate_last else act(first) * second).flatten(d, d + 1)
    else:
        h = act(h)
    if channels_dim == 1:
        return F.conv2d(h, dense(w2)[:, :, None, None], b2)
    return F.linear(h, dense(w2), b2)


def group_hidden(act, gated, gate_last, dim=-1):
    def fn(h):
        if not gated:
            return act(h)
        first, second = h.chunk(2, dim=dim)
        return first * act(second) if gate_last else act(first) * second
    return fn


def mlp_params(groups, c, hidden, gated, dtype=torch.float32, bias=True):
    w1, b1 = params(groups, 2 * hidden if gated else hidden, c, dtype=dtype, bias=bias)
    w2, b2 = params(groups, c, hidden, dtype=dtype, bias=bias)
    return w1, b1, w2, b2


TOKEN_KERNELS = {
    "dispatch": lambda *a: bd_mlp.block_diagonal_mlp(*a[:6], act_params=a[6]),
    "dispatch_recompute": lambda *a: bd_mlp.block_diagonal_mlp(*a[:6], act_params=a[6], recompute=True),
    "tiled_autograd_fn": lambda x, w1, b1, w2, b2, fn, ap: bd_mlp.TiledBlockDiagonalMlp.apply(
        x.reshape(-1, x.shape[-1]), w1, b1, w2, b2, fn, *ap).reshape(*x.shape[:-1], w2.shape[0] * w2.shape[1]),
    "unfused": lambda x, w1, b1, w2, b2, fn, ap: bd_mlp.mlp_per_group(x, w1, b1, w2, b2, fn),
    "batched": lambda x, w1, b1, w2, b2, fn, ap: bd_mlp.mlp_batched(x, w1, b1, w2, b2, fn),
}


@pytest.mark.parametrize("kernel", sorted(TOKEN_KERNELS))
@pytest.mark.parametrize("gated,gate_last", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_token_mlp_kernels_match_dense(kernel, gated, gate_last, bias, small_tiles):
    torch.manual_seed(0)
    groups, c, hidden = 4, 16, 64
    w1, b1, w2, b2 = mlp_params(groups, c, hidden, gated, bias=bias)
    act = StarReLU()  # scalar parameters: their gradients go through the fused backward too
    act_params = tuple(act.parameters())
    x = torch.randn(3, 70, c, requires_grad=True)  # 210 tokens: three full 64-token tiles and a remainder
    fn = group_hidden(act, gated, gate_last)
    y = TOKEN_KERNELS[kernel](x, w1, b1, w2, b2, fn, act_params)
    ref = reference_mlp(x, w1, b1, w2, b2, act, gated, gate_last, groups)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    inputs = (x, w1, b1, w2, b2, *act_params)
    assert_close_all(grads(y, inputs, g), grads(ref, inputs, g), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(TOKEN_KERNELS[kernel](x, w1, b1, w2, b2, fn, act_params), ref,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_tiled_forward_without_autograd_matches_dense(bias, small_tiles):
    torch.manual_seed(0)
    w1, b1, w2, b2 = mlp_params(4, 16, 64, gated=False, bias=bias)
    x = torch.randn(200, 16)
    with torch.no_grad():
        y = bd_mlp.mlp_tiles_forward(x, w1, b1, w2, b2, F.gelu)
        torch.testing.assert_close(y, reference_mlp(x, w1, b1, w2, b2, F.gelu), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated", [False, True])
def test_tiled_mlp_gradcheck_float64(gated, small_tiles):
    torch.manual_seed(0)
    w1, b1, w2, b2 = mlp_params(2, 4, 8, gated, dtype=torch.float64)
    act = StarReLU().double()
    fn = group_hidden(act, gated, True)
    x = torch.randn(130, 4, dtype=torch.float64, requires_grad=True)  # 3 tiles of 64

    def run(x, w1, b1, w2, b2, scale, shift):
        return bd_mlp.TiledBlockDiagonalMlp.apply(x, w1, b1, w2, b2, fn, scale, shift)

    assert torch.autograd.gradcheck(run, (x, w1, b1, w2, b2, act.scale, act.bias))


def test_tiled_mlp_skips_gradients_nobody_asked_for(small_tiles):
    torch.manual_seed(0)
    w1, b1, w2, b2 = mlp_params(2, 8, 16, gated=False)
    x = torch.randn(100, 8)  # an input that needs no gradient, like a model's first layer
    y = bd_mlp.block_diagonal_mlp(x, w1, b1, w2, b2, F.gelu, recompute=True)
    y.sum().backward()
    ref_w1 = w1.grad.clone()
    w1.grad = None
    reference_mlp(x, w1, b1, w2, b2, F.gelu).sum().backward()
    torch.testing.assert_close(ref_w1, w1.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gated", [False, True])
def test_nchw_mlp_both_layouts_match_dense(gated, small_tiles, monkeypatch):
    torch.manual_seed(0)
    groups = 4
    w1, b1, w2, b2 = mlp_params(groups, 16, 32, gated)
    act = nn.GELU()
    x = torch.randn(2, 16, 9, 7, requires_grad=True)
    ref = reference_mlp(x, w1, b1, w2, b2, act, gated, True, groups, channels_dim=1)
    g = torch.randn_like(ref)
    ref_grads = grads(ref, (x, w1, b1, w2, b2), g)
    for on_tokens in (True, False):
        monkeypatch.setattr(dispatch, "nchw_on_tokens", lambda t, v=on_tokens: v)
        fn = group_hidden(act, gated, True, dim=-1 if on_tokens else 1)
        y = bd_mlp.block_diagonal_mlp_nchw(x, w1, b1, w2, b2, fn)
        assert y.is_contiguous()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        assert_close_all(grads(y, (x, w1, b1, w2, b2), g), ref_grads, rtol=1e-4, atol=1e-4)


# --- SchemeMlp: the fast path and its fallbacks ----------------------------------------------------------

def layered(mlp: SchemeMlp):
    """The same module forced onto the layered path (fc1 -> act -> fc2 modules)."""
    mlp.fused_kernel_ok = lambda: False
    return mlp


@pytest.mark.parametrize("use_conv", [False, True])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("act_layer", [nn.GELU, StarReLU, nn.SiLU])
@pytest.mark.parametrize("recompute", [False, True])
def test_scheme_mlp_fast_path_equals_layered_path(use_conv, gated, act_layer, recompute, small_tiles):
    torch.manual_seed(0)
    kw = dict(groups=4, gated=gated, act_layer=act_layer, use_conv=use_conv)
    fast = SchemeMlp(16, 32, **kw)
    fast.recompute_hidden = recompute
    slow = layered(SchemeMlp(16, 32, **kw))
    slow.load_state_dict(fast.state_dict())
    assert fast.fused_kernel_ok()
    x = torch.randn(2, 16, 9, 8) if use_conv else torch.randn(2, 90, 16)
    for mode in ("train", "eval"):
        fast.train(mode == "train")
        slow.train(mode == "train")
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fast(xa), slow(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ga = grads(ya, [xa] + list(fast.parameters()), g)
        gb = grads(yb, [xb] + list(slow.parameters()), g)
        assert_close_all(ga, gb, rtol=1e-4, atol=1e-4)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), slow(x), rtol=1e-5, atol=1e-5)


def test_scheme_mlp_fused_module_fast_path_equals_layered(small_tiles):
    torch.manual_seed(0)
    fast = SchemeMlp(16, 64, groups=4).eval()
    slow = layered(SchemeMlp(16, 64, groups=4)).eval()
    slow.load_state_dict(fast.state_dict())
    x = torch.randn(3, 50, 16)
    with torch.no_grad():
        expected = slow(x)
        keys = {k: v.shape for k, v in fast.state_dict().items() if "mix" not in k and "cca" not in k}
        fast.fuse()
        torch.testing.assert_close(fast(x), expected, rtol=1e-5, atol=1e-5)
        assert {k: v.shape for k, v in fast.state_dict().items()} == keys  # layout is a runtime detail


@pytest.mark.parametrize("change", ["hidden_norm", "dropout", "inplace_act", "softmax_act", "unknown_act",
                                    "channel_act"])
def test_fast_path_falls_back_when_something_mixes_groups(change):
    torch.manual_seed(0)
    mlp = SchemeMlp(16, 32, groups=4)
    if change == "hidden_norm":
        mlp.norm = nn.LayerNorm(32)
    elif change == "dropout":
        mlp.drop1 = nn.Dropout(0.1)
    elif change == "inplace_act":
        mlp.act = nn.ReLU(inplace=True)
    elif change == "softmax_act":
        mlp.act = nn.Softmax(dim=-1)
    elif change == "unknown_act":
        mlp.act = type("MyAct", (nn.Module,), {"forward": lambda self, x: x * 2})()
    elif change == "channel_act":
        mlp.act = nn.PReLU(32)
    assert not mlp.fused_kernel_ok()
    x = torch.randn(10, 16)  # 2-D, so PReLU's channel dim is the last one
    ref = reference_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias,
                        lambda h: mlp.norm(mlp.act(h.clone())))
    mlp.eval()
    with torch.no_grad():
        torch.testing.assert_close(mlp.bd_mlp(x), ref, rtol=1e-5, atol=1e-5)
    if change == "dropout":
        assert mlp.fused_kernel_ok()  # dropout only matters while training


def test_elementwise_activation_detection():
    assert _is_elementwise(nn.GELU()) and _is_elementwise(StarReLU()) and _is_elementwise(nn.Identity())
    assert not _is_elementwise(nn.GLU()) and not _is_elementwise(nn.PReLU(8)) and not _is_elementwise(nn.RReLU())


def test_bf16_autocast_runs_the_mlp_close_to_float32():
    torch.manual_seed(0)
    mlp = SchemeMlp(32, 128, groups=4).train()
    x = torch.randn(2, 40, 32)
    ref = mlp(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
        y.float().sum().backward()
        with torch.no_grad():
            y_eval = mlp.eval()(x)
    assert mlp.fc1.weight.grad is not None and mlp.mix_logits.grad is not None
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(y_eval.float(), mlp(x), rtol=5e-2, atol=5e-2)


# --- CCA -------------------------------------------------------------------------------------------------

def naive_cca(x, scale, normalize, channels_last):
    b = x.shape[0]
    t = x.reshape(b, -1, x.shape[-1]) if channels_last else x.reshape(b, x.shape[1], -1).transpose(1, 2)
    k = F.normalize(t, dim=1) if normalize else t
    a = torch.softmax(k.transpose(1, 2) @ k * scale, dim=-1)
    out = t @ a.transpose(1, 2)
    return out.reshape(x.shape) if channels_last else out.transpose(1, 2).reshape(x.shape)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("normalize", [False, True])
def test_cca_custom_backward_matches_autograd_reference(channels_last, normalize):
    torch.manual_seed(0)
    x = torch.randn(3, 11, 8, requires_grad=True) if channels_last else torch.randn(3, 8, 4, 5, requires_grad=True)
    cca = ChannelCovarianceAttention(0.2, normalize=normalize, channels_last=channels_last)
    y, ref = cca(x), naive_cca(x, 0.2, normalize, channels_last)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    torch.testing.assert_close(grads(y, (x,), g)[0], grads(ref, (x,), g)[0], rtol=1e-5, atol=1e-5)
    x64 = x.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(cca, (x64,))


def test_cca_function_gradcheck_with_separate_keys():
    torch.manual_seed(0)
    tokens = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    for channels_last in (False, True):
        assert torch.autograd.gradcheck(
            lambda t, k: cca_mod.CovarianceAttention.apply(t, k, 0.3, channels_last), (tokens, keys))


def test_cca_skip_keeps_gradients_on_the_mixing_weights():
    """Skipping CCA must leave no parameter without a gradient (DDP) and is decided from the mixing
    weights, which every rank holds identically."""
    torch.manual_seed(0)
    mlp = SchemeMlp(8, 16, groups=2).train()
    mlp.cca_skip_threshold = 0.01
    with torch.no_grad():
        mlp.mix_logits.copy_(torch.tensor([6.0, -6.0]))
    x = torch.randn(2, 5, 8)
    mlp(x).sum().backward()
    assert mlp._cca_skipped
    assert all(p.grad is not None for p in mlp.parameters())
    assert mlp.mix_logits.grad.abs().sum() > 0
    with torch.no_grad():
        mlp.mix_logits.copy_(torch.tensor([0.0, 0.0]))
    assert not mlp.update_cca_skip()


def test_train_refreshes_the_cached_skip_decision():
    mlp = SchemeMlp(8, 16, groups=2)
    mlp.cca_skip_threshold = 0.2
    with torch.no_grad():
        mlp.mix_logits.copy_(torch.tensor([5.0, -5.0]))
    assert not mlp._cca_skipped
    mlp.eval().train()
    assert mlp._cca_skipped
