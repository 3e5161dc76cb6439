"""What a checkpoint needs beyond Lightning's own state to resume exactly, and to say what it came from.

:class:`ResumeState` adds under the checkpoint key ``"moco_lightning"`` (all of it loads with
``torch.load(weights_only=True)``): ``rng``, the torch / numpy / Python generator states of every process,
restored at ``on_train_start`` so a resume draws the augmentations the uninterrupted run would have drawn;
``config`` (the composed Hydra config, YAML) and ``version``; ``world_size`` and ``global_batch``; ``wandb_id``
(:mod:`moco_lightning.checkpointing.loggers`). It also works around Lightning issue #20550: when
``configure_optimizers`` reads ``estimated_stepping_batches`` the saved loader position is never loaded, so at
``on_train_start`` it is put back (:func:`moco_lightning.lightning_internals.restore_loader_position`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger

from moco_lightning.lightning_internals import restore_loader_position

__all__ = ["CHECKPOINT_KEY", "ResumeState", "logger_state", "package_version"]

log = logging.getLogger(__name__)

#: Top-level key of the checkpoint under which :class:`ResumeState` stores its entries.
CHECKPOINT_KEY = "moco_lightning"


def package_version() -> str:
    """The installed version of moco-lightning (``"unknown"`` when run from a tree that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moco-lightning")
    except PackageNotFoundError:
        return "unknown"


def logger_state(loggers: Iterable[Logger]) -> dict[str, Any]:
    """What a checkpoint keeps to continue the loggers' runs: the wandb run id (``{"wandb_id": ...}`` or empty).

    :func:`~moco_lightning.checkpointing.continue_loggers` reads it back on resume.
    """
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.version:
            return {"wandb_id": str(logger.version)}
    return {}


def capture_rng_state() -> dict[str, Any]:
    """The states of this process's torch CPU, CUDA (when initialised), numpy and Python generators."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(position), int(has_gauss),
                  float(cached_gaussian)),
        "python": random.getstate(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's generators to a state of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


class ResumeState(Callback):
    """Save every process's generators, the config (YAML text, stored as is) and the version; restore on resume."""

    def __init__(self, config: str | None = None) -> None:
        self.config = config
        self._loaded: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Add the ``"moco_lightning"`` entry; gathers the generator states of all processes (a collective).

        Also writes the loggers' buffered rows to disk, so that a run killed after this checkpoint keeps every row
        the checkpoint covers (the CSV logger otherwise writes every 100 steps).
        """
        for logger in trainer.loggers:
            logger.save()
        states = [capture_rng_state()]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, states[0])
            states = gathered
        checkpoint[CHECKPOINT_KEY] = {
            "version": package_version(),
            "config": self.config,
            "world_size": trainer.world_size,
            "global_batch": _global_batch(trainer),
            "rng": states,
            **logger_state(trainer.loggers),  # the wandb run id, to continue the same run on resume
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Keep the entry until training starts (the generators must be set after everything else is built)."""
        self._loaded = checkpoint.get(CHECKPOINT_KEY)
        if self._loaded is None:
            log.warning("the checkpoint has no '%s' entry (written without the ResumeState callback): the random "
                        "generators start from the run's seed, so augmentations will differ from an uninterrupted "
                        "run", CHECKPOINT_KEY)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Restore the loader's position and this process's generators (in that order: no draw in between)."""
        restore_loader_position(trainer)
        if self._loaded is None:
            return
        saved, self._loaded = self._loaded, None
        states = saved.get("rng") or []
        world, saved_world = trainer.world_size, int(saved.get("world_size", len(states)))
        batch, saved_batch = _global_batch(trainer), saved.get("global_batch")
        if saved_world != world or (batch is not None and saved_batch is not None and batch != saved_batch):
            if trainer.is_global_zero:
                log.info("resuming a run of %d process(es), global batch %s, with %d process(es), global batch %s: "
                         "the random streams cannot continue exactly (each process restarts from a saved one)",
                         saved_world, saved_batch, world, batch)
        if states:
            restore_rng_state(states[trainer.global_rank % len(states)])


def _global_batch(trainer: L.Trainer) -> int | None:
    from moco_lightning.optim import trainer_images_per_optimizer_step

    try:
        return trainer_images_per_optimizer_step(trainer)
    except (ValueError, AttributeError):
        return None
