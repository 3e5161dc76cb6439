"""What a checkpoint needs beyond Lightning's own state to resume exactly, and to say what it came from.

Lightning saves weights, optimizer, lr schedulers, loop counters and (for a resumable loader) the loader's
position, but not the random number generators. :class:`ResumeState` adds, under the checkpoint key
``"moco_lightning"``:

* ``rng``: the states of the torch (CPU and CUDA), numpy and Python generators of every process, gathered at
  save time, so the augmentations drawn after a resume are the ones the uninterrupted run would have drawn;
* ``config``: the composed Hydra config of the run (YAML text) and ``version``: the package version;
* ``world_size`` and ``global_batch``: the number of processes and the images per optimizer step;
* ``wandb_id``: the wandb run id when a wandb logger is active, so that a resume continues the same run
  (:mod:`moco_lightning.checkpointing.loggers`).

All of it loads with ``torch.load(weights_only=True)``. The generators are restored at ``on_train_start``,
after Lightning has rebuilt everything and right before the first batch is drawn.

It also works around Lightning issue #20550 (open in 2.6): when ``configure_optimizers`` reads
``trainer.estimated_stepping_batches`` (every lr schedule here does), the train loader is built before the
checkpoint is restored, and Lightning never hands the saved loader position to it, so a run resumed mid-epoch
would start the epoch over. At ``on_train_start`` the pending position is loaded into the loader and its iterator
re-created, as the normal restore path does (:func:`moco_lightning.lightning_internals.restore_loader_position`,
with the other Lightning internals in use).
"""

from __future__ import annotations

import logging
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from moco_lightning.checkpointing.loggers import logger_state
from moco_lightning.lightning_internals import restore_loader_position

__all__ = ["CHECKPOINT_KEY", "ResumeState", "package_version"]

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
    """Save the generators of every process, the config and the version in each checkpoint; restore on resume.

    Args:
        config: the composed config as YAML text, stored as is (the training CLI sets it); ``None`` stores none.

    """

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
    from moco_lightning.optim import global_batch_size

    try:
        return global_batch_size(trainer)
    except (ValueError, AttributeError):
        return None
