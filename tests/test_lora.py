"""PEFT LoRA on SCHEME's block-diagonal layers: the adapted layer against a dense re-computation, exact merging,
training, adapters saved and loaded by PEFT, and the merged model fused, saved and loaded by timm."""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

import timm_scheme  # noqa: E402
from timm_scheme import fuse_for_inference, scheme_mixers  # noqa: E402
from timm_scheme.layers import BlockDiagonalConv1x1, BlockDiagonalLinear  # noqa: E402
from timm_scheme.integrations.lora import BlockDiagonalLora, register_lora  # noqa: E402

from .scenarios import patched_deit  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def lora(model: nn.Module, **options) -> nn.Module:
    config = register_lora(LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["fc1", "fc2"], **options}))
    return get_peft_model(model, config)


def dense_update(layer: BlockDiagonalLora, name: str = "default") -> torch.Tensor:
    """scaling * B A as a dense (out, in) matrix, block by block with explicit loops."""
    a, b = layer.lora_A[name].weight.detach().double(), layer.lora_B[name].weight.detach().double()
    blocks = [b[k] @ a[k] for k in range(a.shape[0])]
    return torch.block_diag(*blocks) * layer.lora_alpha[name] / layer.r[name]


@pytest.mark.parametrize("kind", [BlockDiagonalLinear, BlockDiagonalConv1x1])
def test_adapted_layer_matches_a_dense_recomputation(kind):
    torch.manual_seed(0)
    holder = nn.Sequential()
    holder.add_module("fc1", kind(16, 32, 4))
    model = get_peft_model(holder, register_lora(LoraConfig(r=3, lora_alpha=5, target_modules=["fc1"],
                                                            init_lora_weights=False)))
    layer = model.base_model.model.fc1
    assert isinstance(layer, BlockDiagonalLora)
    base = layer.get_base_layer()
    weight = base.dense_weight().double() + dense_update(layer)
    if kind is BlockDiagonalLinear:
        x = torch.randn(2, 5, 16)
        expected = x.double() @ weight.T + base.bias.double()
    else:
        x = torch.randn(2, 16, 3, 3)
        expected = torch.einsum("oc,bchw->bohw", weight, x.double()) + base.bias.double()[:, None, None]
    torch.testing.assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_wrapped_projections_leave_the_fused_kernels():
    model = lora(patched_deit(), init_lora_weights=False)
    mixer = next(iter(scheme_mixers(model).values()))
    assert not mixer.plain_projections() and not mixer.fused_kernel_ok()
    assert (model(images()) - patched_deit()(images())).abs().max() > 1e-3  # the adapters act


def test_merge_is_exact_and_the_merged_weights_are_the_blocks_plus_the_update():
    model = lora(patched_deit(), init_lora_weights=False).eval()
    x = images()
    with torch.no_grad():
        unmerged = model(x)
    expected = {name: (m.get_base_layer().dense_weight().double() + dense_update(m))
                for name, m in model.base_model.model.named_modules() if isinstance(m, BlockDiagonalLora)}
    merged = model.merge_and_unload()
    assert not any(isinstance(m, BlockDiagonalLora) for m in merged.modules())
    for name, weight in expected.items():
        torch.testing.assert_close(merged.get_submodule(name).dense_weight().double(), weight, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-5, atol=1e-5)


def test_training_moves_only_the_adapters_and_lowers_the_loss():
    model = lora(patched_deit(cca=True))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    x, target = images(16), torch.arange(16) % 10
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n


def test_adapters_save_and_load_with_peft(tmp_path):
    model = lora(patched_deit(), init_lora_weights=False).eval()
    model.save_pretrained(tmp_path / "adapter")
    config = register_lora(LoraConfig.from_pretrained(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(patched_deit(), tmp_path / "adapter", config=config).eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_merged_model_fuses_saves_and_loads_like_any_scheme_model(tmp_path):
    model = lora(patched_deit(cca=True), init_lora_weights=False).eval()
    with torch.no_grad():
        for mixer in scheme_mixers(model).values():
            mixer.mix_logits.copy_(torch.tensor([2.0, -1.0]))
    with pytest.raises(ValueError, match="merge the adapters first"):
        fuse_for_inference(model.base_model.model)
    with pytest.raises(ValueError, match=r"merge_and_unload"):
        timm_scheme.save_pretrained(model.base_model.model, tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    x = images()
    with torch.no_grad():
        eval_output = model(x)
    merged = model.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the CCA weight fusing discards
        fuse_for_inference(merged, x)
    timm_scheme.save_pretrained(merged, tmp_path / "merged")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'merged'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), eval_output, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), eval_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option, value", [("use_dora", True), ("init_lora_weights", "pissa"),
                                           ("lora_bias", True)])
def test_unsupported_options_are_refused_clearly(option, value):
    with pytest.raises(ValueError, match=rf"{option}.* not supported on block-diagonal layers"):
        lora(patched_deit(), **{option: value})


def test_without_registration_peft_refuses():
    with pytest.raises(ValueError, match="not supported"):
        get_peft_model(patched_deit(), LoraConfig(r=2, target_modules=["fc1"]))


def test_a_per_group_update_keeps_what_a_dense_low_rank_update_would_lose():
    """Why the adapter is per group: a dense rank-r update projected onto the blocks keeps about 1/groups of its
    energy; the per-group one keeps all of it (its parameter count equals the dense LoRA's)."""
    model = lora(copy.deepcopy(patched_deit()), init_lora_weights=False)
    layer = model.base_model.model.blocks[0].mlp.fc1
    torch.manual_seed(0)
    dense = torch.randn(1536, 2) @ torch.randn(2, 192)
    mask = torch.block_diag(*[torch.ones(384, 48)] * 4)
    kept = float((dense * mask).norm() ** 2 / dense.norm() ** 2)
    assert 0.2 < kept < 0.3  # about 1/4 at groups=4 (0.247-0.251 over 10 seeds)
    # the update the adapted layer applies, read from its outputs on the unit vectors (no bias: it cancels)
    with torch.no_grad():
        eye = torch.eye(192)
        update = (layer(eye) - layer.get_base_layer()(eye)).double().T
    assert float(update.norm()) > 1.0  # the adapter acts (B is drawn non-zero)
    assert float((update * mask).norm()) == pytest.approx(float(update.norm()), rel=1e-6)  # all of it in the blocks
    # rank r per group (float32 rounding aside): beyond what a dense rank-r update reaches
    assert torch.linalg.matrix_rank(update, rtol=1e-4).item() == 4 * 2
    torch.testing.assert_close(update, dense_update(layer), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n) == 2 * (192 + 1536)
