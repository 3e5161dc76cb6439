"""A callback that sends its own process a signal at a given point of training (used by the resume tests).

The resume tests add it on the command line (``+callbacks.kill._target_=kill_helpers.SignalAt``) with this folder
on ``PYTHONPATH``, so a real ``python train.py`` process is killed where the test wants it.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAt(Callback):
    """Send ``signal_name`` to this process once ``after_step`` optimizer steps are done, or at ``epoch``'s start.

    At the start of the next batch, so the callbacks of step ``after_step`` (its checkpoint) have all run.
    """

    def __init__(self, after_step: int | None = None, epoch: int | None = None, signal_name: str = "SIGKILL",
                 rank: int | None = None) -> None:
        self.after_step, self.epoch, self.signum = after_step, epoch, getattr(signal, signal_name)
        self.rank = rank  # only the process of this global rank signals itself (None: every process)
        self.sent = False

    def _send(self, trainer) -> None:
        if not self.sent and self.rank in (None, trainer.global_rank):
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.after_step is not None and trainer.global_step == self.after_step:
            self._send(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self.epoch is not None and trainer.current_epoch == self.epoch:
            self._send(trainer)
