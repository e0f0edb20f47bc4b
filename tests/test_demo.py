"""The main job (`timm-scheme demo`) end to end on a tiny budget."""
import re

import pytest

from timm_scheme.cli import main


def test_demo_runs_and_reports_consistent_numbers(capsys):
    with pytest.warns(UserWarning, match="discarded a CCA weight"):  # CCA not annealed: fusing drops it
        code = main(["demo", "--steps", "3", "--batch-size", "16", "--cca", "--cca-anneal", "off", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "check: PASS" in out
    assert "mixers replaced        12" in out
    # MLP parameters of DeiT-Tiny (C=192): dense E=4 -> BD g=4, E=8, recomputed here from the formulas
    c = 192
    dense = 12 * (c * 4 * c + 4 * c + 4 * c * c + c)
    block = 12 * (2 * (c * 8 * c) // 4 + 8 * c + c)
    assert re.search(rf"MLP parameters\s+{dense:,} ->\s+{block:,}", out), out
    diff = float(re.search(r"max relative difference (\S+)", out).group(1))
    assert diff <= 1e-5
    assert len(re.findall(r"^  blocks\.\d+\.mlp\s+0\.\d+", out, flags=re.M)) == 12


def test_demo_rejects_bad_groups(capsys):
    with pytest.raises(ValueError, match="groups=5 does not divide"):
        main(["demo", "--steps", "1", "--groups", "5"])


def test_demo_with_cca_shows_the_branch_fading_and_fusing_removing_it(capsys):
    code = main(["demo", "--steps", "8", "--batch-size", "16", "--cca", "--cca-form", "output_cross", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "check: PASS" in out
    reports = re.findall(r"^  step\s+(\d+): CCA over 12 mixers: weight ([\d.]+), share ([\d.]+)", out, flags=re.M)
    assert [int(step) for step, _, _ in reports] == [0, 2, 4, 6, 8]
    weights = [float(w) for _, w, _ in reports]
    assert weights[0] == pytest.approx(0.5, abs=1e-3) and weights[-1] == 0.0  # faded out with the learning rate
    assert 0.0 < float(reports[0][2]) <= 0.5 and float(reports[-1][2]) == 0.0
    assert "CCA tensors left       0" in out
