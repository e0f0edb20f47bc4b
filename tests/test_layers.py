"""The pure layers against independent dense references."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_scheme import BlockDiagonalConv1x1, BlockDiagonalLinear, ChannelCovarianceAttention, SchemeMlp


def masked_dense(weight: torch.Tensor) -> torch.Tensor:
    """Dense matrix built with an explicit block mask (independent of block_diag)."""
    g, o, i = weight.shape
    dense = torch.zeros(g * o, g * i, dtype=weight.dtype)
    mask = torch.zeros(g * o, g * i, dtype=torch.bool)
    for k in range(g):
        dense[k * o:(k + 1) * o, k * i:(k + 1) * i] = weight[k]
        mask[k * o:(k + 1) * o, k * i:(k + 1) * i] = True
    assert torch.equal(dense * mask, dense)
    return dense


@pytest.mark.parametrize("groups,in_f,out_f", [(1, 8, 12), (2, 8, 12), (4, 16, 32), (3, 9, 6)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(5,), (2, 7), (2, 3, 4)])
def test_block_diagonal_linear_matches_masked_dense(groups, in_f, out_f, bias, lead):
    layer = BlockDiagonalLinear(in_f, out_f, groups, bias=bias)
    x = torch.randn(*lead, in_f)
    ref = x @ masked_dense(layer.weight.detach()).T
    if bias:
        ref = ref + layer.bias.detach()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dense_weight(), masked_dense(layer.weight.detach()))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("bias", [True, False])
def test_block_diagonal_conv_matches_grouped_conv(groups, bias):
    layer = BlockDiagonalConv1x1(8, 16, groups, bias=bias)
    x = torch.randn(2, 8, 5, 3)
    weight = layer.weight.detach().reshape(16, 8 // groups, 1, 1)
    ref = F.conv2d(x, weight, layer.bias, groups=groups)
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    # and against the dense masked matrix applied channel-wise
    dense = torch.einsum("oc,bchw->bohw", masked_dense(layer.weight.detach()), x)
    if bias:
        dense = dense + layer.bias.detach().view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-5)


def test_block_diagonal_gradients_match_masked_dense():
    layer = BlockDiagonalLinear(8, 12, 4)
    x = torch.randn(3, 5, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    w = masked_dense(layer.weight.detach()).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (x2 @ w.T + layer.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    expected = torch.stack([w.grad[k * 3:(k + 1) * 3, k * 2:(k + 1) * 2] for k in range(4)])
    torch.testing.assert_close(layer.weight.grad, expected)


def test_block_diagonal_bad_groups():
    with pytest.raises(ValueError, match="groups=3 must divide in_features=8"):
        BlockDiagonalLinear(8, 12, 3)


def naive_cca(x: torch.Tensor, scale: float, normalize: bool, channels_last: bool) -> torch.Tensor:
    """Per-sample loop over the definition: A = softmax_rows(s X^T X), out = X A^T (X is N x C)."""
    out = torch.empty_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        sample = x[b].double()
        mat = sample.reshape(-1, sample.shape[-1]) if channels_last else sample.reshape(sample.shape[0], -1).T
        keys = mat / mat.norm(dim=0, keepdim=True).clamp_min(1e-12) if normalize else mat
        logits = scale * keys.T @ keys
        attn = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        attn = attn / attn.sum(dim=1, keepdim=True)
        res = mat @ attn.T
        out[b] = res.reshape(sample.shape) if channels_last else res.T.reshape(sample.shape)
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shape,channels_last", [((3, 7, 6), True), ((2, 3, 4, 6), True), ((2, 6, 3, 5), False),
                                                 ((4, 6), True)])
def test_cca_matches_naive_loop(shape, channels_last, normalize):
    x = torch.randn(*shape)
    scale = 0.3 if not normalize else 5.0
    cca = ChannelCovarianceAttention(scale, normalize=normalize, channels_last=channels_last)
    torch.testing.assert_close(cca(x).double(), naive_cca(x, scale, normalize, channels_last),
                               rtol=1e-5, atol=1e-5)


def test_cca_is_a_convex_mix_of_channels():
    # with one token per sample the covariance is x x^T; a constant input is left unchanged
    cca = ChannelCovarianceAttention(0.1)
    x = torch.full((2, 5, 8), 3.0)
    torch.testing.assert_close(cca(x), x)


def test_cca_stable_for_large_token_counts_and_extreme_values():
    for normalize in (False, True):
        x = (torch.randn(1, 56 * 56, 16) * 1e3).requires_grad_()
        out = ChannelCovarianceAttention(16 ** -0.5, normalize=normalize)(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_gradcheck_float64():
    torch.manual_seed(1)
    lin = BlockDiagonalLinear(4, 6, 2).double()
    conv = BlockDiagonalConv1x1(4, 6, 2).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    xc = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    for layer, inp in ((lin, x), (conv, xc)):
        params = (layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_())
        assert torch.autograd.gradcheck(
            lambda a, w, b: torch.func.functional_call(layer, {"weight": w, "bias": b}, (a,)), (inp, *params))
    for normalize, channels_last, inp in ((False, True, x), (True, True, x), (False, False, xc)):
        cca = ChannelCovarianceAttention(0.5, normalize=normalize, channels_last=channels_last)
        assert torch.autograd.gradcheck(cca, (inp,))
    mlp = SchemeMlp(4, 8, groups=2, alpha_init=0.3).double().train()
    logits = mlp.mix_logits.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, t: torch.func.functional_call(mlp, {"mix_logits": t}, (a,), strict=False), (x, logits))


def reference_scheme(mlp: SchemeMlp, x: torch.Tensor, with_cca: bool) -> torch.Tensor:
    """SCHEME mixer recomputed from dense masked weights (channels-last, ungated, GELU, no norm)."""
    h = F.gelu(x @ masked_dense(mlp.fc1.weight.detach()).T + mlp.fc1.bias.detach())
    y = h @ masked_dense(mlp.fc2.weight.detach()).T + mlp.fc2.bias.detach()
    w = torch.softmax(mlp.mix_logits.detach().float(), 0)
    out = w[0] * y
    if with_cca:
        out = out + w[1] * naive_cca(x, mlp.cca.scale, False, True).float()
    return out


def test_scheme_mlp_train_and_eval_semantics():
    mlp = SchemeMlp(8, 32, groups=4, alpha_init=0.7)
    x = torch.randn(2, 5, 8)
    mlp.train()
    torch.testing.assert_close(mlp(x), reference_scheme(mlp, x, with_cca=True), rtol=1e-5, atol=1e-5)
    mlp.eval()
    eval_reference = reference_scheme(mlp, x, with_cca=False)
    torch.testing.assert_close(mlp(x), eval_reference, rtol=1e-5, atol=1e-5)
    assert math.isclose(mlp.cca_weight(), 0.3, rel_tol=1e-6)
    fused = mlp.fuse()
    assert fused is mlp and fused.cca is None and fused.mix_logits is None and fused.cca_weight() == 0.0
    assert not any("mix" in k or "cca" in k for k in fused.state_dict())
    torch.testing.assert_close(fused(x), eval_reference, rtol=1e-5, atol=1e-5)
    fused.train()  # a fused mixer is the plain BD-MLP in both modes
    torch.testing.assert_close(fused(x), eval_reference, rtol=1e-5, atol=1e-5)


def test_scheme_mlp_fuse_is_exact_against_eval():
    mlp = SchemeMlp(8, 32, groups=4, alpha_init=0.37).eval()
    x = torch.randn(4, 9, 8)
    with torch.no_grad():
        before = mlp(x)
        after = mlp.fuse()(x)
    assert ((after - before).abs().max() / before.abs().max()) <= 1e-6


@pytest.mark.parametrize("gate_last", [True, False])
@pytest.mark.parametrize("use_conv", [False, True])
def test_gated_scheme_mlp_keeps_value_and_gate_in_one_group(gate_last, use_conv):
    g, c, h = 2, 4, 6
    mlp = SchemeMlp(c, h, groups=g, gated=True, gate_last=gate_last, act_layer=torch.nn.SiLU, cca=False,
                    use_conv=use_conv).eval()
    x = torch.randn(3, 5, c)
    xin = x.permute(0, 2, 1).reshape(3, c, 5, 1) if use_conv else x
    out = mlp(xin)
    if use_conv:
        out = out.reshape(3, c, 5).permute(0, 2, 1)
    # reference: per group k, fc1 rows [first half | second half] of that group's block
    w1, b1 = mlp.fc1.weight.detach(), mlp.fc1.bias.detach().view(g, 2 * h // g)
    w2 = masked_dense(mlp.fc2.weight.detach())
    units = []
    for k in range(g):
        pre = x[..., k * (c // g):(k + 1) * (c // g)] @ w1[k].T + b1[k]
        first, second = pre[..., :h // g], pre[..., h // g:]
        units.append(first * F.silu(second) if gate_last else F.silu(first) * second)
    ref = torch.cat(units, -1) @ w2.T + mlp.fc2.bias.detach()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_autocast_bf16_cpu_runs_and_keeps_cca_in_float32():
    mlp = SchemeMlp(16, 64, groups=4).train()
    x = torch.randn(2, 10, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mlp(x)
        cca_out = mlp.cca(x.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(x.grad).all() and mlp.mix_logits.grad is not None
    ref = naive_cca(x.detach().bfloat16().float(), mlp.cca.scale, False, True).float()
    torch.testing.assert_close(cca_out.float(), ref, rtol=2e-2, atol=2e-2)


def test_skip_threshold_drops_cca_in_training_only_when_negligible():
    mlp = SchemeMlp(8, 16, groups=2, alpha_init=0.999).train()
    x = torch.randn(2, 3, 8)
    mlp.cca_skip_threshold = 0.01
    torch.testing.assert_close(mlp(x), reference_scheme(mlp, x, with_cca=False), rtol=1e-5, atol=1e-5)
    mlp.cca_skip_threshold = 0.0001
    torch.testing.assert_close(mlp(x), reference_scheme(mlp, x, with_cca=True), rtol=1e-5, atol=1e-5)


def test_cca_limit_scales_the_cca_weight():
    mlp = SchemeMlp(8, 16, groups=2, alpha_init=0.6).train()
    mlp.cca_limit.fill_(0.5)
    assert math.isclose(mlp.cca_weight(), 0.2, rel_tol=1e-6)
    assert math.isclose(mlp.cca_weight(learnt=True), 0.4, rel_tol=1e-6)  # the logits are untouched
    mlp.cca_limit.fill_(0.0)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(mlp(x), mlp.bd_mlp(x))


def test_scheme_mlp_bad_input():
    with pytest.raises(ValueError, match="groups=3 does not divide in_features=8"):
        SchemeMlp(8, 12, groups=3)
    with pytest.raises(ValueError, match="CCA needs in_features == out_features"):
        SchemeMlp(8, 16, 4, groups=2)
    with pytest.raises(ValueError, match="alpha_init"):
        SchemeMlp(8, 16, groups=2, alpha_init=1.0)


def test_device_and_dtype_follow_arguments():
    mlp = SchemeMlp(8, 16, groups=2, dtype=torch.float64, device="cpu")
    assert mlp.fc1.weight.dtype == torch.float64 and mlp.fc1.weight.device.type == "cpu"
    out = mlp.train()(torch.randn(2, 3, 8, dtype=torch.float64))
    assert out.dtype == torch.float64
