"""A self-contained smoke run: a few MoCo steps on random tensors, on the CPU, in under a minute."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from moco_lightning.module import MoCo


def main(steps: int = 5, batch_size: int = 8, image_size: int = 16) -> MoCo:
    """Train MoCo v2 with a ResNet-18 on random two-view tensors and print the loss."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, image_size, image_size, generator=g)
    views = TensorDataset(images + 0.05 * torch.randn_like(images), images + 0.05 * torch.randn_like(images))
    loader = DataLoader(
        [((a, b), 0) for a, b in views], batch_size=batch_size, shuffle=True, drop_last=True
    )
    model = MoCo("resnet18", cifar_stem=True, queue_size=32, momentum=0.99, temperature=0.2, mlp=True,
                 lr=0.03, lr_schedule="cosine")
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    trainer.fit(model, loader)
    print(f"MoCo ran {trainer.global_step} steps; last loss {float(trainer.callback_metrics['train/loss']):.3f}")
    return model


if __name__ == "__main__":
    main()
