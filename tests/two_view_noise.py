"""The tiny two-view dataset the module tests train on (importable from any test: tests/ holds a conftest.py)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

SIZE = 8


class TwoViewNoise(Dataset):
    """``n`` fixed random ``SIZE`` px images, each in two noisy views, labels 0..3: enough to run MoCo steps."""

    def __init__(self, n: int = 16) -> None:
        self.images = torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        x = self.images[i]
        return (x + 0.05 * torch.randn_like(x), x + 0.05 * torch.randn_like(x)), i % 4
