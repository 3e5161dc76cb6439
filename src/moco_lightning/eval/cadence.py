"""When an epoch-end monitor runs: every n-th epoch and always after the last one.

The kNN monitor (:class:`~moco_lightning.eval.knn.KNNMonitor`) runs every ``every_n_epochs``; the representation
diagnostics (:class:`~moco_lightning.eval.diagnostics_monitor.DiagnosticsMonitor`) and the embedding map
(:class:`~moco_lightning.eval.embedding_map.EmbeddingMap`) follow the trainer's kNN monitor unless given their own
cadence (:func:`moco_lightning.eval.knn.monitor_every_n_epochs`), so that their cost shows up at the same epochs.
This module knows no monitor: the kNN monitor uses it too.
"""

from __future__ import annotations

import lightning as L

__all__ = ["is_monitor_epoch"]


def is_monitor_epoch(trainer: L.Trainer, every_n_epochs: int | None) -> bool:
    """Whether a monitor run every ``every_n_epochs`` epochs (``None``: only after the last) runs after this one."""
    if trainer.sanity_checking:
        return False
    epoch = trainer.current_epoch + 1
    last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
    return last or (every_n_epochs is not None and epoch % every_n_epochs == 0)
