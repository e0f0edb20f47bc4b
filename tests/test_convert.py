"""init="dense": converting pretrained dense MLPs into block-diagonal ones (timm_scheme.conversion)."""
import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers.mlp import ConvMlp, GluMlp, Mlp, SwiGLU

from timm_scheme import SchemeMlp, save_pretrained, scheme_mixers
from timm_scheme import scheme_patch as _scheme_patch
from timm_scheme.conversion import (
    OutputErrorStats, assign_units, dense_weights, diagonal_units, energy_scores, init_from_dense,
    layer_output_errors, original_unit_slots, total_score)
from timm_scheme.patching.patch import find_mlps
from timm_scheme.training.distill import Distiller

from .models import create, example_input
from .references import cut_to_routes, route_groups

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def scheme_patch(model, *args, **options):
    """These tests exercise SCHEME with its CCA branch (off by default): mixing weights, folding alpha, fusing."""
    return _scheme_patch(model, *args, **{"cca": True, **options})


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Give the MLP weights structure (as training does): a few channels and units much stronger."""
    with torch.no_grad():
        for _, mlp in find_mlps(model):
            for p in mlp.parameters():
                if p.dim() >= 2:
                    p.mul_(torch.rand(p.shape[0], *([1] * (p.dim() - 1))) * 3)
                    p.mul_(torch.rand(1, p.shape[1], *([1] * (p.dim() - 2))) * 3)
    return model


def _projection_of(dense: torch.nn.Module, patched: torch.nn.Module) -> torch.nn.Module:
    """The block-diagonal projection computed directly on the dense model: each kept unit's fc1 row masked to
    its group's input channels and fc2 column to its group's output channels; dropped units silenced."""
    reference = copy.deepcopy(dense)
    modules = dict(reference.named_modules())
    groups = patched.scheme_config.groups
    for name, layer in patched.scheme_init_report.layers.items():
        mlp = modules[name]
        firsts = [mlp.fc1_g, mlp.fc1_x] if isinstance(mlp, SwiGLU) else [mlp.fc1]  # GluMlp: fc1 holds both halves
        in_group, out_group = route_groups(layer.units, groups, mlp.fc2.weight.shape[1])
        cut_to_routes([fc1.weight for fc1 in firsts], mlp.fc2.weight, in_group, out_group, groups)
    return reference


# --- the premise and the assignment ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "glu", "swiglu", "conv"])
def test_permuting_hidden_units_leaves_a_dense_mlp_unchanged(kind):
    mlp = {"mlp": lambda: Mlp(16, 40), "glu": lambda: GluMlp(16, 80, gate_last=False),
           "swiglu": lambda: SwiGLU(16, 40),
           "conv": lambda: ConvMlp(16, 40, norm_layer=torch.nn.BatchNorm2d)}[kind]().eval()
    x = torch.randn(3, 16, 4, 4) if kind == "conv" else torch.randn(3, 7, 16)
    if kind == "conv":  # non-trivial statistics, so a mismatched permutation would show
        mlp.norm.running_mean.normal_()
        mlp.norm.running_var.uniform_(0.5, 2)
    perm = torch.randperm(40)
    permuted = copy.deepcopy(mlp)
    with torch.no_grad():
        fc1s = [permuted.fc1_g, permuted.fc1_x] if kind == "swiglu" else [permuted.fc1]
        for fc1 in fc1s:
            rows = torch.cat([perm, perm + 40]) if kind == "glu" else perm
            fc1.weight.copy_(fc1.weight[rows])
            fc1.bias.copy_(fc1.bias[rows])
        permuted.fc2.weight.copy_(permuted.fc2.weight[:, perm])
        if kind == "conv":
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(permuted.norm, attr).copy_(getattr(permuted.norm, attr)[perm])
    assert not torch.equal(permuted.fc2.weight, mlp.fc2.weight)
    torch.testing.assert_close(permuted(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_assignment_is_optimal_against_brute_force():
    torch.manual_seed(1)
    for slots in ([2, 2, 2], [1, 1, 1], [2, 1, 2]):
        scores = torch.rand(6, 3, dtype=torch.float64) ** 3
        units = assign_units(scores, slots)
        assert [len(u) for u in units] == slots
        assert len({u for kept in units for u in kept}) == sum(slots)
        best = 0.0
        for labels in itertools.product(range(-1, 3), repeat=6):  # -1 = left out
            if all(labels.count(k) == n for k, n in enumerate(slots)):
                best = max(best, sum(float(scores[u, k]) for u, k in enumerate(labels) if k >= 0))
        assert total_score(scores, units) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("hidden,new_hidden", [(48, 48), (48, 96), (48, 24), (50, 64)])
def test_assignment_is_balanced_and_never_worse_than_the_diagonal(hidden, new_hidden):
    groups = 4
    mlp = Mlp(16, hidden)
    with torch.no_grad():
        mlp.fc1.weight.mul_(torch.rand(hidden, 1) * torch.rand(1, 16) * 4)
    weights = dense_weights(mlp)
    scores = energy_scores(weights, groups)
    slots = original_unit_slots(hidden, new_hidden, groups)
    units = assign_units(scores, slots)
    assert [len(u) for u in units] == slots
    assert max(slots) - min(slots) <= 1 and sum(slots) == min(hidden, new_hidden)
    assert total_score(scores, units) >= total_score(scores, diagonal_units(hidden, slots)) - 1e-9
    # the energy of a full assignment is a share of the weights: a group-1 assignment keeps all of it
    assert total_score(energy_scores(weights, 1), [list(range(hidden))]) == pytest.approx(1.0)


def test_output_error_scores_match_a_direct_computation():
    torch.manual_seed(2)
    groups, mlp = 2, Mlp(8, 12).eval()
    x = torch.randn(5, 8)
    stats = OutputErrorStats(mlp, dense_weights(mlp), groups)
    with torch.no_grad():
        stats.add(x)
        scores = stats.scores()
    for h, k in [(0, 0), (3, 1), (11, 0)]:
        w1, b1, w2 = (t.detach() for t in (mlp.fc1.weight[h], mlp.fc1.bias[h], mlp.fc2.weight[:, h]))
        full = F.gelu(x @ w1 + b1)[:, None] * w2
        cols = slice(4 * k, 4 * k + 4)
        mask = torch.zeros(8)
        mask[cols] = 1
        block = F.gelu(x[:, cols] @ w1[cols] + b1)[:, None] * (w2 * mask)
        expected = -(full - block).pow(2).sum(1).mean()
        assert float(scores[h, k]) == pytest.approx(float(expected), rel=1e-4)


# --- the converted model --------------------------------------------------------------------------------

CASES = [  # (architecture, expansion): same width, wider (silent units), narrower (dropped units)
    ("deit_tiny_patch16_224", None), ("deit_tiny_patch16_224", 8), ("deit_tiny_patch16_224", 2),
    ("eva02_tiny_patch14_224", 8),  # GluMlp
    ("eva02_tiny_patch14_224.swiglu", None),  # SwiGLU with a hidden LayerNorm (exact at the same width)
    ("poolformer_s12", 8),  # 1x1-conv Mlp on NCHW
    ("mobilevitv2_050", 4),  # ConvMlp: BatchNorm per hidden unit
]


@pytest.mark.parametrize("key,expansion", CASES)
def test_step0_eval_model_is_the_block_diagonal_projection(key, expansion):
    dense = _trained_like(create(key)).eval()
    x = example_input(key)
    patched = scheme_patch(copy.deepcopy(dense), groups=4, expansion=expansion, init="dense", alpha_init=0.3)
    reference = _projection_of(dense, patched).eval()
    with torch.no_grad():
        expected, got = reference(x), patched.eval()(x)
    assert min(layer_output_errors(dense, patched, x).values()) > 0.05  # the projection really drops something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_silent_units_start_at_zero_and_can_learn():
    dense = create("deit_tiny_patch16_224")
    patched = scheme_patch(dense, groups=4, expansion=8, init="dense")
    layer = patched.scheme_init_report.layers["blocks.0.mlp"]
    mixer = scheme_mixers(patched)["blocks.0.mlp"]
    silent = (torch.tensor([u for kept in layer.units for u in kept]) < 0).view(4, -1)  # (groups, units/group)
    assert silent.sum() == 192 * 8 - 192 * 4  # the units beyond the original width
    fc2_columns = mixer.fc2.weight.transpose(1, 2)  # (groups, units/group, out/group)
    assert fc2_columns[silent].abs().max() == 0
    assert (fc2_columns[~silent].abs().sum(-1) > 0).all()
    assert (mixer.fc1.weight[silent].abs().sum(-1) > 0).all()  # random fc1 rows: gradients reach them
    patched.train()
    patched(example_input("deit_tiny_patch16_224")).logsumexp(-1).sum().backward()
    assert mixer.fc2.weight.grad.transpose(1, 2)[silent].abs().sum() > 0


def test_dense_init_beats_the_diagonal_on_energy_and_output_error():
    dense = _trained_like(create("deit_tiny_patch16_224")).eval()
    x = example_input("deit_tiny_patch16_224", batch=8)
    best = scheme_patch(copy.deepcopy(dense), groups=4, expansion=None, init="dense")
    calibrated = scheme_patch(copy.deepcopy(dense), groups=4, expansion=None, init="dense", calibration_data=[(x, 0)])
    naive = scheme_patch(copy.deepcopy(dense), groups=4, expansion=None)
    originals = dict(find_mlps(dense))
    naive_report = init_from_dense(dense, [(n, originals[n], m) for n, m in scheme_mixers(naive).items()], 4,
                                   assignment="diagonal")
    for name, layer in best.scheme_init_report.layers.items():
        assert layer.retained_energy >= naive_report.layers[name].retained_energy - 1e-9
        assert layer.retained_energy == pytest.approx(naive_report.layers[name].retained_energy, abs=0.3)
    errors = {n: layer_output_errors(dense, m, x) for n, m in (("best", best), ("cal", calibrated), ("naive", naive))}
    mean = {n: sum(e.values()) / len(e) for n, e in errors.items()}
    assert mean["best"] < mean["naive"] and mean["cal"] < mean["naive"]
    assert calibrated.scheme_init_report.layers["blocks.0.mlp"].objective == "output_error"


def test_calibrated_refit_is_a_least_squares_fit_and_keeps_new_units_silent():
    dense = _trained_like(create("deit_tiny_patch16_224")).eval()
    calibration = torch.randn(6, 3, 32, 32)
    one_shot = ((calibration[i:i + 3], None) for i in (0, 3))  # a generator: read once, used twice
    refit = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, init="dense", calibration_data=one_shot)
    plain = scheme_patch(copy.deepcopy(dense), groups=4, expansion=8, init="dense")
    assert all(layer.refit for layer in refit.scheme_init_report.layers.values())
    refit_errors = layer_output_errors(dense, refit, calibration)
    plain_errors = layer_output_errors(dense, plain, calibration)
    assert all(refit_errors[n] < 0.5 * plain_errors[n] for n in refit_errors)
    # a least-squares optimum: nudging the refit fc2 of any kept unit makes the fit on the calibration set worse
    mixer = scheme_mixers(refit)["blocks.1.mlp"]
    for _ in range(3):
        nudged = copy.deepcopy(refit)
        with torch.no_grad():
            kept = mixer.fc2.weight.clone()
            kept[:, :, 192:] = 0  # each group's first 192 slots hold original units, the rest are silent
            scheme_mixers(nudged)["blocks.1.mlp"].fc2.weight.add_(0.02 * torch.randn_like(kept) * kept.abs().mean() *
                                                                  (kept != 0))
        assert layer_output_errors(dense, nudged, calibration)["blocks.1.mlp"] > refit_errors["blocks.1.mlp"]
    silent = torch.tensor(refit.scheme_init_report.layers["blocks.1.mlp"].units).view(4, -1) < 0
    assert mixer.fc2.weight.transpose(1, 2)[silent].abs().max() == 0


@pytest.mark.parametrize("key", ["poolformer_s12", "eva02_tiny_patch14_224.swiglu", "mobilevitv2_050"])
def test_calibrated_refit_across_layouts_and_hidden_norms(key):
    dense = _trained_like(create(key)).eval()
    calibration = example_input(key, batch=4)
    refit = scheme_patch(copy.deepcopy(dense), groups=4, expansion=None, init="dense", calibration_data=calibration)
    plain = scheme_patch(copy.deepcopy(dense), groups=4, expansion=None, init="dense")
    refit_errors = layer_output_errors(dense, refit, calibration)
    plain_errors = layer_output_errors(dense, plain, calibration)
    assert sum(refit_errors.values()) < 0.8 * sum(plain_errors.values())


def test_alpha_init_default_follows_init():
    assert scheme_patch(create("deit_tiny_patch16_224"), init="dense").scheme_config.alpha_init == 0.9
    assert scheme_patch(create("deit_tiny_patch16_224")).scheme_config.alpha_init == 0.5
    model = scheme_patch(create("deit_tiny_patch16_224"), init="dense", alpha_init=0.6)
    assert scheme_mixers(model)["blocks.0.mlp"].cca_weight() == pytest.approx(0.4)


def test_dense_init_round_trips_through_a_checkpoint(tmp_path):
    dense = _trained_like(create("deit_tiny_patch16_224"))
    patched = scheme_patch(dense, groups=4, expansion=8, init="dense").eval()
    save_pretrained(patched, tmp_path / "ckpt")
    loaded = timm.create_model(f"local-dir:{tmp_path / 'ckpt'}", pretrained=True).eval()
    x = example_input("deit_tiny_patch16_224")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), patched(x))
    assert loaded.scheme_config.init == "dense"
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["model_args"]["scheme"]
    assert saved["config"]["init"] == "dense"


def test_dense_init_bad_input():
    with pytest.raises(ValueError, match="calibration_data is used by init='dense' only"):
        scheme_patch(create("deit_tiny_patch16_224"), calibration_data=torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"init='bogus'.*dense"):
        scheme_patch(create("deit_tiny_patch16_224"), init="bogus")
    with torch.device("meta"):
        meta = create("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"layer 'blocks.0.mlp' has no weights to convert \(meta-device"):
        scheme_patch(meta, init="dense")
    broken = create("deit_tiny_patch16_224")
    with torch.no_grad():
        broken.blocks[3].mlp.fc2.weight[0, 0] = float("nan")
    before = copy.deepcopy(broken.state_dict())
    with pytest.raises(ValueError, match="layer 'blocks.3.mlp' has no weights to convert .*non-finite"):
        scheme_patch(broken, init="dense")
    assert not any(isinstance(m, SchemeMlp) for m in broken.modules())
    assert broken.state_dict().keys() == before.keys()  # nothing was replaced
    model = create("deit_tiny_patch16_224")
    with pytest.raises(ValueError, match=r"calibration batch 0 of shape \(2, 5, 32, 32\) does not run"):
        scheme_patch(model, init="dense", calibration_data=torch.randn(2, 5, 32, 32))
    with pytest.raises(ValueError, match="expected a tensor of images or an iterable"):
        scheme_patch(model, init="dense", calibration_data=3.0)
    with pytest.raises(ValueError, match="a batch is a str"):
        scheme_patch(model, init="dense", calibration_data=["images"])
    assert not hasattr(model, "scheme_config")  # every failure left the model dense
    with pytest.raises(ValueError, match="groups=5 does not divide"):
        scheme_patch(model, groups=5, init="dense")
    with pytest.raises(ValueError, match="assignment='best-ish'"):
        init_from_dense(model, [], 4, assignment="best-ish")


# --- distillation ---------------------------------------------------------------------------------------

def test_distiller_losses_against_direct_computation():
    teacher = create("deit_tiny_patch16_224").eval()
    x = example_input("deit_tiny_patch16_224", batch=4)
    # groups=1 at the same width without CCA: the student starts exactly at the teacher
    twin = scheme_patch(copy.deepcopy(teacher), groups=1, expansion=None, cca=False, init="dense").eval()
    logits, loss = Distiller(teacher, twin, block_weight=1.0)(x)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)

    student = scheme_patch(copy.deepcopy(teacher), groups=4, expansion=8, init="dense").train()
    distiller = Distiller(teacher, student, temperature=3.0, logit_weight=0.5, block_weight=0.0)
    logits, loss = distiller(x)
    with torch.no_grad():
        t = teacher(x)
    p_t = F.softmax(t / 3, -1)
    expected = 0.5 * 9 * (p_t * (F.log_softmax(t / 3, -1) - F.log_softmax(logits.detach() / 3, -1))).sum(-1).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.blocks[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert "teacher" not in " ".join(k for k, _ in distiller.named_parameters())

    blocks = Distiller(teacher, scheme_patch(copy.deepcopy(teacher), groups=4, expansion=8), logit_weight=0.0,
                       block_weight=1.0)
    _, block_loss = blocks(x)
    assert float(block_loss.detach()) > 0.1
    blocks.remove()
    assert not blocks.student.blocks[0].mlp._forward_hooks


def test_distiller_bad_input():
    teacher = create("deit_tiny_patch16_224")
    student = scheme_patch(copy.deepcopy(teacher), groups=4, expansion=8)
    with pytest.raises(ValueError, match="temperature=0"):
        Distiller(teacher, student, temperature=0)
    with pytest.raises(ValueError, match="both 0"):
        Distiller(teacher, student, logit_weight=0, block_weight=0)
    with pytest.raises(ValueError, match="has no SCHEME mixer"):
        Distiller(teacher, copy.deepcopy(teacher), block_weight=1.0)
    other = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              depth=2)
    with pytest.raises(ValueError, match="teacher has no module named"):
        Distiller(other, student, block_weight=1.0)


def test_example_script_quick(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "convert_pretrained.py"), "--quick",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "dense_init_quick.json").read_text())
    rows = data["runs"][0]["expansions"]["8"]
    assert set(rows) == {"random", "diagonal", "dense", "diagonal_refit", "dense_calibrated", "dense+distill",
                         "dense_calibrated+distill"}
    assert rows["dense"]["weight_energy_kept"] >= rows["diagonal"]["weight_energy_kept"]
    assert rows["random"]["weight_energy_kept"] is None
