"""Resuming with another global batch (another number of processes): the lr follows it, the log says so."""

from __future__ import annotations

import logging

import pytest
from checkpointing_helpers import loader, tiny_moco, tiny_trainer

from moco_lightning.checkpointing import ResumeState


def test_resume_with_a_larger_global_batch_rescales_the_lr_and_logs_it(tmp_path, caplog):
    first = tiny_trainer(tmp_path / "first", max_epochs=1)
    first.fit(tiny_moco(scale_lr=True, lr=0.03), loader(n=16, batch_size=4))  # 4 steps at a global batch of 4
    first.save_checkpoint(tmp_path / "epoch0.ckpt")
    assert first.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.03 * 4 / 256)

    lrs = []

    class RecordLr(ResumeState):
        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    resumed = tiny_trainer(tmp_path / "resumed", callbacks=[RecordLr()], max_epochs=2)
    with caplog.at_level(logging.INFO):
        resumed.fit(tiny_moco(scale_lr=True, lr=0.03), loader(n=16, batch_size=8), ckpt_path=tmp_path / "epoch0.ckpt")
    assert lrs == [pytest.approx(0.03 * 8 / 256)] and resumed.global_step == 4 + 2
    assert "the lr follows this run's global batch" in caplog.text
    assert "base lr 0.00046875 in the checkpoint, 0.0009375 now" in caplog.text
