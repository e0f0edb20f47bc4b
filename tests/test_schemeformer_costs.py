"""``examples/schemeformer_costs.py``, the source of the SCHEMEformer page's table: its counts of
schemeformer_ppaa_s12_224 against counts made another way (parameters summed on a model created and fused here;
MACs from torch's own counter on timm's explicit attention, and from the dense E=4 model minus what the
block-diagonal MLP saves, plus the CCA branch by its formula), and the committed results file against the code."""
import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import timm_scheme

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "schemeformer_costs.py"
RESULTS = ROOT / "examples" / "results" / "schemeformer_costs.json"
NAME = "schemeformer_ppaa_s12_224"
DEPTHS, WIDTHS, TOKENS = (2, 2, 6, 2), (64, 128, 320, 512), (56 * 56, 28 * 28, 14 * 14, 7 * 7)  # 224 px, strides 4..32
# sum over the mixers of N C^2 (N tokens, C channels): the dense E=4 MLP costs 8 N C^2, the g=4 E=8 BD-MLP half
# of it, CCA 2 N C^2 (X^T X and the attention applied to X)
NC2 = sum(d * n * c * c for d, n, c in zip(DEPTHS, TOKENS, WIDTHS))


@pytest.fixture(scope="module")
def costs():
    spec = importlib.util.spec_from_file_location("schemeformer_costs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def row(costs, one_thread):
    return costs.measure(NAME)


def plain_macs(model: nn.Module) -> int:
    """torch's counter alone, with timm's explicit attention (matmuls it has formulas for) on every block."""
    from timm.models.metaformer import Attention
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    assert len(attention) == DEPTHS[2] + DEPTHS[3]
    for m in attention:
        m.fused_attn = False
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()(torch.zeros(1, 3, 224, 224))
    return counter.get_total_flops() // 2


def test_parameters_match_models_created_here(row):
    torch.manual_seed(0)
    model = timm.create_model(NAME, pretrained=False, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == row["params_training"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timm_scheme.fuse_for_inference(model)
    assert timm_scheme.is_fused(model)
    assert sum(p.numel() for p in model.parameters()) == row["params_fused"]
    # what fusing removes: the two mixing logits of each of the 12 mixers
    assert row["params_training"] - row["params_fused"] == 2 * sum(DEPTHS)
    assert plain_macs(model) == row["macs_inference"]


def test_macs_match_the_dense_model_and_the_cca_formula(row, one_thread):
    from timm.layers import GroupNorm1, LayerNorm
    from timm.models.metaformer import Attention, MetaFormer, Pooling
    dense = MetaFormer(depths=DEPTHS, dims=WIDTHS, token_mixers=(Pooling, Pooling, Attention, Attention),
                       norm_layers=(GroupNorm1, GroupNorm1, LayerNorm, LayerNorm), downsample_norm=None,
                       mlp_act=nn.GELU, mlp_bias=True, layer_scale_init_values=1e-5, res_scale_init_values=None,
                       use_mlp_head=False, num_classes=1000)
    dense_macs = plain_macs(dense)
    assert row["macs_inference"] == dense_macs - 4 * NC2
    assert row["macs_training_cca"] == row["macs_inference"] + 2 * NC2
    committed = json.loads(RESULTS.read_text())
    s12 = next(d for d in committed["dense"] if d["depths"] == list(DEPTHS))
    assert (s12["params"], s12["macs"]) == (sum(p.numel() for p in dense.parameters()), dense_macs)


def test_committed_results_match_the_code(row):
    committed = json.loads(RESULTS.read_text())
    assert committed["input_size"] == [3, 224, 224] and committed["num_classes"] == 1000
    assert [r["model"] for r in committed["models"]] == timm.list_models("schemeformer_ppaa_*")
    assert next(r for r in committed["models"] if r["model"] == NAME) == row


def test_an_unknown_model_is_named(costs, capsys):
    with pytest.raises(ValueError, match="schemeformer_ppaa_s99_224"):
        costs.measure("schemeformer_ppaa_s99_224")
    with pytest.raises(SystemExit):
        costs.main(["--models", NAME, "schemeformer_ppaa_s99_224"])
    assert "not SCHEMEformer models: schemeformer_ppaa_s99_224" in capsys.readouterr().err
