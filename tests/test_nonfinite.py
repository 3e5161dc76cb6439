"""NonFiniteLossGuard: a NaN loss stops the run naming its step, and no checkpoint after it is ever written."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from moco_lightning import MoCo
from moco_lightning.checkpointing import AtomicCheckpointIO
from moco_lightning.nonfinite import NonFiniteLossError, NonFiniteLossGuard
from two_view_noise import TwoViewNoise


class PoisonBatch(Callback):
    """Make the query images of the batch after ``after_step`` steps NaN (its loss becomes NaN)."""

    def __init__(self, after_step: int) -> None:
        self.after_step = after_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.after_step:
            batch[0][0].fill_(float("nan"))


def _fit(tmp_path, callbacks, log_every_n_steps=1):
    model = MoCo(backbone="resnet18", dim=8, queue_size=16, temperature=0.2, lr=0.01, lr_schedule="constant", bn="none")
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=callbacks,
                        log_every_n_steps=log_every_n_steps, enable_progress_bar=False, enable_model_summary=False,
                        plugins=[AtomicCheckpointIO()], default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(model, DataLoader(TwoViewNoise(32), batch_size=4, drop_last=True))
    return trainer, str(info.value)


def test_nan_loss_stops_before_a_checkpoint_with_nan_weights_is_written(tmp_path):
    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer, message = _fit(tmp_path, [NonFiniteLossGuard(check_every_n_steps=100), PoisonBatch(2), every])
    assert "the training loss became nan at step 3" in message and "last finite loss was" in message
    assert "at step 2" in message and "step=2.ckpt" in message and "\n" not in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=1.ckpt", "step=2.ckpt"]
    last_good = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=True)["state_dict"]
    assert all(torch.isfinite(t).all() for t in last_good.values() if t.is_floating_point())


def test_nan_loss_is_found_at_the_next_logging_step_with_the_last_values_logged(tmp_path):
    trainer, message = _fit(tmp_path, [NonFiniteLossGuard(), PoisonBatch(2)], log_every_n_steps=2)
    assert trainer.global_step == 4  # read on the host at the logging steps only (2, 4, ...)
    assert "the training loss became nan at step 3" in message
    assert "last values logged (by step 2)" in message and "train/loss=" in message


def test_a_checkpoint_with_non_finite_weights_is_refused_even_with_a_finite_loss(tmp_path):
    class PoisonWeight(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.encoder_q.head[0].weight[0, 0] = float("inf")

    every = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    _, message = _fit(tmp_path, [NonFiniteLossGuard(), PoisonWeight(), every])
    assert "encoder_q.head.0.weight holds NaN or infinite values at step 2" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step=1.ckpt"]
