"""PreemptionCheckpoint: SIGUSR1 / SIGTERM stop the run after the step, save a checkpoint, and give the signal back."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from checkpointing_helpers import loader, tiny_moco, tiny_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from moco_lightning.checkpointing import PreemptionCheckpoint


class SignalAfter(Callback):
    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigusr1_finishes_the_step_saves_last_ckpt_and_restores_the_handler(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    preemption = PreemptionCheckpoint()
    trainer = tiny_trainer(tmp_path, callbacks=[preemption, SignalAfter(1, signal.SIGUSR1)], max_epochs=3)
    with pytest.raises(SIGTERMException):
        trainer.fit(tiny_moco(), loader(n=32))
    assert preemption.signum == signal.SIGUSR1 and trainer.global_step == 2  # the step in progress finished
    assert preemption.saved_path == tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(preemption.saved_path, weights_only=True)["global_step"] == 2
    assert signal.getsignal(signal.SIGUSR1) == before


def test_under_slurm_auto_requeue_lightning_saves_the_hpc_checkpoint_and_requeues(tmp_path, monkeypatch):
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "moco", "SLURM_JOB_ID": "4242", "SLURM_NODEID": "0",
                        "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NODELIST": "node1"}.items():
        monkeypatch.setenv(name, value)
    requeued = []
    monkeypatch.setattr("lightning.pytorch.trainer.connectors.signal_connector.call",
                        lambda command, **kwargs: requeued.append(command) or 0)
    preemption = PreemptionCheckpoint()
    trainer = tiny_trainer(tmp_path, callbacks=[preemption, SignalAfter(1, signal.SIGUSR1)], max_epochs=3)
    with pytest.raises(SIGTERMException):
        trainer.fit(tiny_moco(), loader(n=32))
    assert requeued == [["scontrol", "requeue", "4242"]]
    assert preemption.saved_path == tmp_path / "hpc_ckpt_1.ckpt"
    assert torch.load(preemption.saved_path, weights_only=True)["global_step"] == 2  # saved after the whole step


def test_submitits_sigusr2_is_handed_over_after_the_checkpoint_is_written(tmp_path):
    seen = []

    def submitit_handler(signum, frame):  # stands for submitit's checkpoint_and_try_requeue
        seen.append((signum, (tmp_path / "checkpoints" / "last.ckpt").is_file()))

    before = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        preemption = PreemptionCheckpoint()
        trainer = tiny_trainer(tmp_path, callbacks=[preemption, SignalAfter(1, signal.SIGUSR2)], max_epochs=3)
        with pytest.raises(SIGTERMException):
            trainer.fit(tiny_moco(), loader(n=32))
        assert trainer.global_step == 2 and torch.load(preemption.saved_path, weights_only=True)["global_step"] == 2
        assert seen == [(signal.SIGUSR2, True)]  # called once, after the save
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
    finally:
        signal.signal(signal.SIGUSR2, before)
