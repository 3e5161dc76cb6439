"""Helpers of the checkpointing tests: a tiny MoCo, its loaders and a Trainer with the project's checkpoint IO."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from moco_lightning import MoCo
from moco_lightning.checkpointing import AtomicCheckpointIO
from two_view_noise import TwoViewNoise


def loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    return DataLoader(TwoViewNoise(n), batch_size=batch_size, shuffle=False, drop_last=True)


def tiny_moco(**kwargs: Any) -> MoCo:
    defaults: dict[str, Any] = dict(backbone="resnet18", cifar_stem=False, dim=8, queue_size=16, momentum=0.9,
                                    temperature=0.2, lr=0.01, lr_schedule="constant", bn="none")  # batches of 4
    defaults.update(kwargs)
    return MoCo(**defaults)


def tiny_trainer(root: Path, callbacks: Sequence[Callback] = (), **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(max_epochs=1, accelerator="cpu", devices=1, logger=False,
                                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                                    plugins=[AtomicCheckpointIO()],
                                    enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks))
    defaults.update(kwargs)
    return L.Trainer(callbacks=list(callbacks), **defaults)


def training_checkpoint(model: torch.nn.Module, path: Path, **extra: Any) -> Path:
    """Save ``model`` as a minimal training checkpoint (the keys a resume needs, no optimizer history)."""
    checkpoint = {"state_dict": model.state_dict(), "optimizer_states": [], "loops": {}, "global_step": 0,
                  "epoch": 0, "hyper_parameters": dict(getattr(model, "hparams", {})), **extra}
    torch.save(checkpoint, path)
    return path
