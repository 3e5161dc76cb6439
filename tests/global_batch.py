"""The global batch of a composed training config, with the library's one definition of it."""

from __future__ import annotations

from omegaconf import DictConfig

from moco_lightning.cli import count_processes
from moco_lightning.optim import images_per_optimizer_step


def config_images_per_step(cfg: DictConfig) -> int:
    """:func:`~moco_lightning.optim.images_per_optimizer_step` of a config (devices x nodes known before the run)."""
    processes = count_processes(cfg.trainer)
    assert processes is not None, "the config's device count is not known before the run"
    return images_per_optimizer_step(cfg.data.batch_size, processes, cfg.trainer.get("accumulate_grad_batches", 1))
