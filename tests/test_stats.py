"""MAC counts, public as ``timm_scheme.count_macs``, against counts worked out by hand on tiny models."""
from __future__ import annotations

import pytest
from torch import nn

import timm_scheme
from timm_scheme import SchemeMlp, count_macs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_count_macs_is_public():
    assert "count_macs" in timm_scheme.__all__ and count_macs is timm_scheme.stats.count_macs


@pytest.mark.parametrize("use_conv", [False, True])
def test_count_macs_equals_the_count_by_hand(use_conv):
    """N tokens, C = 32 channels, hidden 128, g = 4: each block-diagonal projection costs N * 32 * 128 / 4, CCA
    (its eval-mode function is the BD-MLP alone) 2 N C^2 for X^T X and the attention applied to X."""
    if use_conv:  # a 4x4 stride-4 conv on 3 x 8 x 12: 2 x 3 = 6 positions, 3 * 16 inputs each
        stem, input_size, tokens, stem_macs = nn.Conv2d(3, 32, 4, stride=4), (3, 8, 12), 6, 6 * 32 * 3 * 16
    else:
        stem, input_size, tokens, stem_macs = nn.Linear(16, 32), (5, 16), 5, 5 * 16 * 32
    model = nn.Sequential(stem, SchemeMlp(32, 128, groups=4, use_conv=use_conv))
    mlp = 2 * tokens * 32 * 128 // 4
    cca = 2 * tokens * 32 * 32
    assert count_macs(model, input_size) == stem_macs + mlp
    assert count_macs(model, input_size, with_cca=True) == stem_macs + mlp + cca
