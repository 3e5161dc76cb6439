"""Save a checkpoint and stop when the job is told to go: SIGTERM, or SIGUSR1 (what SLURM sends before preemption).

Lightning stops on SIGTERM but saves nothing, and its SLURM SIGUSR1 handler saves mid-step, which does not resume
exactly. :class:`PreemptionCheckpoint` makes both stop the run after a whole step, then save (``hpc_ckpt_<n>.ckpt``
and ``scontrol requeue`` through Lightning's handler under SLURM auto-requeue, else ``last.ckpt``). A signal may
reach only some processes, so with several the handler only records it and the processes all-reduce it after every
batch (gloo, CPU): all stop after the same step. Under submitit, SIGUSR2 also saves ``last.ckpt`` before
submitit's own handler resubmits. The training CLI then exits ``128 + signal`` so an orchestrator restarts it.
Lightning internals used: see :mod:`moco_lightning.lightning_internals`; docs/resuming.md tells the whole story.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch.distributed
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moco_lightning.distributed import cpu_group, max_over_processes
from moco_lightning.lightning_internals import (
    request_stop_after_step,
    require_internals,
    signal_handler_snapshot,
    slurm_requeue,
)

__all__ = ["PreemptionCheckpoint"]

log = logging.getLogger(__name__)


class PreemptionCheckpoint(Callback):
    """On SIGTERM / SIGUSR1: finish the current step, save a checkpoint, stop (``SIGTERMException``).

    ``filename`` is written outside SLURM auto-requeue, in the ``ModelCheckpoint`` folder (else
    ``<default_root_dir>/checkpoints``); ``signum`` and ``saved_path`` are the signal and its checkpoint, or ``None``.
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.signum: int | None = None
        self.saved_path: Path | None = None
        self._fitting: L.Trainer | None = None
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # the CPU group the processes agree over; None on one process

    # ------------------------------------------------------------------ signals
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Install the handlers (before Lightning's, which then keeps ours for SIGUSR1 and chains them for SIGTERM)."""
        require_internals(trainer, "PreemptionCheckpoint")
        self._fitting, self.signum, self.saved_path = trainer, None, None
        self._group = cpu_group()  # a collective: every process is here
        for name in ("SIGTERM", "SIGUSR1", "SIGUSR2"):
            signum = getattr(signal, name, None)
            if signum is None:  # Windows has no SIGUSR1
                continue
            if name == "SIGUSR2" and not callable(signal.getsignal(signum)):
                continue  # SIGUSR2 only where a handler (submitit's) is waiting to be called after the save
            try:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            except ValueError:  # not the main thread: leave signals to Lightning
                continue

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take SIGTERM back from Lightning's handler (installed since), whose broadcast would hang a lone rank."""
        if signal.SIGTERM in self._previous:
            try:
                signal.signal(signal.SIGTERM, self._on_signal)
            except ValueError:  # not the main thread
                pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        if self._fitting is not None and self._group is None:  # one process: stop after this step
            request_stop_after_step(self._fitting)
        log.info("received %s: stopping after the current step to save a checkpoint", signal.Signals(signum).name)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Several processes: stop all of them after this step when any one was signalled."""
        if self._group is None:
            return
        agreed = max_over_processes(self.signum or 0, self._group)
        if agreed:
            if self.signum is None:
                self.signum = agreed
                log.info("rank %d: another process received %s: stopping after this step", trainer.global_rank,
                         signal.Signals(agreed).name)
            # Lightning's stop flag on every process at once: the loop raises SIGTERMException after this step
            request_stop_after_step(trainer)

    def _restore_handlers(self, trainer: L.Trainer) -> None:
        # Lightning's teardown puts back the handlers it found when it registered its own (ours): point those
        # entries at the handlers from before the run, so that neither path leaves ours installed
        snapshot = signal_handler_snapshot(trainer) if self._previous else {}
        for signum, handler in self._previous.items():
            handler = handler if handler is not None else signal.SIG_DFL
            if signum in snapshot:
                snapshot[signum] = handler
            try:
                signal.signal(signum, handler)
            except ValueError:
                pass
        self._previous, self._fitting = {}, None
        if self._group is not None and self._group is not torch.distributed.group.WORLD:
            torch.distributed.destroy_process_group(self._group)
        self._group = None

    # ------------------------------------------------------------------ saving
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """After a signal stop, write the checkpoint (on SLURM with auto-requeue: Lightning's hpc save + requeue)."""
        handover = None
        try:
            if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
                return
            signum = self.signum if self.signum is not None else int(signal.SIGTERM)
            self.saved_path = slurm_requeue(trainer, signum)
            if self.saved_path is None:
                self.saved_path = self.checkpoint_path(trainer)
                trainer.save_checkpoint(self.saved_path, weights_only=False)
            if trainer.is_global_zero:
                log.info("%s: saved %s at step %d", signal.Signals(signum).name, self.saved_path, trainer.global_step)
            handover = self._previous.get(signum) if signum == getattr(signal, "SIGUSR2", None) else None
        finally:
            self._restore_handlers(trainer)
        if callable(handover):  # submitit's: resubmit the job now that the checkpoint is on disk
            handover(signum, None)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Give the signals back to the handlers that were there before the run."""
        self._restore_handlers(trainer)

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        """Where the checkpoint goes: the ``ModelCheckpoint`` folder, else ``<default_root_dir>/checkpoints``."""
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        return Path(folder) / self.filename
