"""Small real data that ships with a package: scikit-learn's handwritten digits (1,797 8x8 images)."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def load_digits_tensors(img_size: int = 32, in_chans: int = 3, test_fraction: float = 0.25,
                        seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): images upsampled to img_size, standardised, a fixed split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # a dependency: missing only from a broken or partial install
        raise ImportError("the digits data needs scikit-learn, a dependency of timm-scheme that is missing here; "
                          "reinstall: pip install timm-scheme") from err
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.5).expand(-1, in_chans, -1, -1).contiguous()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]
