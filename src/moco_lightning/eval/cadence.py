"""When the epoch-end monitors run: every n-th epoch and after the last one, by default at the kNN monitor's cadence.

The kNN monitor (:class:`~moco_lightning.eval.knn.KNNMonitor`) runs every ``every_n_epochs``; the representation
diagnostics (:class:`~moco_lightning.eval.diagnostics_monitor.DiagnosticsMonitor`) and the
embedding map (:class:`~moco_lightning.eval.embedding_map.EmbeddingMap`) read the ``every_n_epochs`` of the
trainer's kNN monitor unless given their own, so that their cost shows up at the same epochs.
"""

from __future__ import annotations

import lightning as L

__all__ = ["is_monitor_epoch", "monitor_every_n_epochs"]


def monitor_every_n_epochs(trainer: L.Trainer, every_n_epochs: int | None = None) -> int | None:
    """``every_n_epochs`` if given, else the kNN monitor's; ``None`` (only after the last epoch) without one."""
    if every_n_epochs is not None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1 or null (the kNN monitor's), got {every_n_epochs}")
        return every_n_epochs
    from moco_lightning.eval.knn import KNNMonitor  # here: the kNN monitor itself uses this module

    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, KNNMonitor):
            return callback.every_n_epochs
    return None


def is_monitor_epoch(trainer: L.Trainer, every_n_epochs: int | None = None) -> bool:
    """Whether an epoch-end monitor runs after the current epoch: every n-th one and always after the last."""
    if trainer.sanity_checking:
        return False
    epoch = trainer.current_epoch + 1
    last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
    n = monitor_every_n_epochs(trainer, every_n_epochs)
    return last or (n is not None and epoch % n == 0)
