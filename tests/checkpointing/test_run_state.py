"""ResumeState: generators, config and version in every checkpoint; the loader's position restored on resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from checkpointing_helpers import tiny_moco, tiny_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from moco_lightning.checkpointing import CHECKPOINT_KEY, ResumeState, package_version
from moco_lightning.checkpointing.run_state import capture_rng_state, restore_rng_state
from moco_lightning.data import DigitsDataModule


class RecordBatches(Callback):
    """The labels of every training batch, in order."""

    def __init__(self) -> None:
        self.labels: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.append(batch[1].tolist())


def _digits() -> DigitsDataModule:
    return DigitsDataModule(batch_size=16, image_size=8, seed=0)


def _epoch_labels(epoch: int, batches: int = 3) -> list[list[int]]:
    """The labels of the first batches of ``epoch`` as the pretraining loader orders them (seed 0)."""
    datamodule = _digits()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return [labels.tolist() for (_, labels), _ in zip(loader, range(batches))]


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
    """One epoch of 3 steps with ResumeState and a checkpoint after every step."""
    root = tmp_path_factory.mktemp("first")
    every = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    trainer = tiny_trainer(root, callbacks=[ResumeState(config="model:\n  queue_size: 48\n"), every],
                           max_epochs=1, limit_train_batches=3)
    trainer.fit(tiny_moco(queue_size=48), datamodule=_digits())
    return root / "ckpt"


def test_generator_states_round_trip():
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(2), np.random.seed(2), random.seed(2)
    restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_checkpoints_carry_the_generators_config_and_version(first_epoch):
    checkpoint = torch.load(first_epoch / "step=2.ckpt", weights_only=True)  # loads safely
    entry = checkpoint[CHECKPOINT_KEY]
    assert entry["config"] == "model:\n  queue_size: 48\n" and entry["version"] == package_version()
    assert entry["world_size"] == 1 and entry["global_batch"] == 16
    assert len(entry["rng"]) == 1 and set(entry["rng"][0]) == {"torch", "cuda", "numpy", "python"}


def test_mid_epoch_resume_continues_with_the_remaining_batches(first_epoch, tmp_path):
    """Lightning issue #20550: without the fix the resumed run starts epoch 0 again from its first batch."""
    expected = _epoch_labels(0)[1:] + _epoch_labels(1)  # the rest of epoch 0, then epoch 1 in its own order
    assert expected[2] != _epoch_labels(0)[0]
    resumed = RecordBatches()
    trainer = tiny_trainer(tmp_path, callbacks=[ResumeState(), resumed], max_epochs=2, limit_train_batches=3)
    trainer.fit(tiny_moco(queue_size=48), datamodule=_digits(), ckpt_path=first_epoch / "step=1.ckpt")
    assert resumed.labels == expected


def test_lightning_still_restarts_the_epoch_without_the_workaround(first_epoch, tmp_path):
    """When this fails, Lightning resumes the loader by itself: restore_loader_position (ResumeState) can go."""
    resumed = RecordBatches()
    trainer = tiny_trainer(tmp_path, callbacks=[resumed], max_epochs=1, limit_train_batches=3)
    trainer.fit(tiny_moco(queue_size=48), datamodule=_digits(), ckpt_path=first_epoch / "step=1.ckpt")
    assert resumed.labels[0] == _epoch_labels(0)[0], (
        "Lightning now resumes a mid-epoch loader whose configure_optimizers reads estimated_stepping_batches "
        "(#20550 fixed, PR #21765 released): drop the restore_loader_position workaround of "
        "ResumeState (moco_lightning/lightning_internals.py)")
