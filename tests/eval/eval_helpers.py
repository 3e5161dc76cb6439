"""Helpers of the evaluation tests: a tiny MoCo, real checkpoints of it, a synthetic labelled datamodule."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from moco_lightning import MoCo

IMAGE_SIZE = 8
NUM_CLASSES = 4


def make_blobs(n: int, seed: int, num_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is a fixed random pattern plus noise: learnable by kNN on raw-ish features."""
    g = torch.Generator().manual_seed(1234)
    prototypes = torch.randn(num_classes, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    g.manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = prototypes[y] + 0.5 * torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return x, y


class _TwoViews(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        return (x + 0.1 * torch.randn_like(x), x + 0.1 * torch.randn_like(x)), self.y[i]


class BlobsDataModule(L.LightningDataModule):
    """The datamodule interface of the contract on synthetic blobs (train 64, val 32)."""

    def __init__(self, batch_size: int = 16, n_train: int = 64, n_val: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_classes = NUM_CLASSES
        self.image_size = IMAGE_SIZE
        self.train = make_blobs(n_train, seed=1)
        self.val = make_blobs(n_val, seed=2)
        self.num_train_samples = n_train
        self.augment_calls: list[bool] = []

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_TwoViews(*self.train), batch_size=self.batch_size, shuffle=True, drop_last=True)

    def eval_train_dataloader(self, augment: bool = False) -> DataLoader:
        self.augment_calls.append(augment)
        return DataLoader(TensorDataset(*self.train), batch_size=self.batch_size)

    def eval_val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.val), batch_size=self.batch_size)


def tiny_moco(**overrides) -> MoCo:
    kwargs = dict(backbone="resnet18", cifar_stem=True, dim=16, queue_size=32, lr=0.01, lr_schedule="constant")
    kwargs.update(overrides)
    return MoCo(**kwargs)


def tiny_trainer(**overrides) -> L.Trainer:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def save_checkpoint(model: MoCo, path: Path) -> Path:
    """Write a real Lightning checkpoint of ``model`` without training it."""
    trainer = tiny_trainer()
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path
