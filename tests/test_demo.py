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
