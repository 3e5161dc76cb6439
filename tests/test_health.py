"""The health monitor in short real runs on 8 px digits: each failure provoked for real warns once, by kind;
a healthy run, a disabled monitor and a process that is not rank 0 stay quiet."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Subset

from moco_lightning import MoCo
from moco_lightning.data import DigitsDataModule
from moco_lightning.eval.knn import KNNMonitor
from moco_lightning.health import PREFIX, HealthMonitor, HealthWarning
from moco_lightning.nonfinite import NonFiniteLossError, NonFiniteLossGuard

BATCH, QUEUE, EVERY = 16, 128, 4  # the queue turns over after 8 steps; a logging step every 4


class IdenticalViews(DigitsDataModule):
    """Digits whose two views are the same image: the too-easy pretext task (augmentation off)."""

    def augment_batch(self, batch, index=None):
        (x_q, _), y = super().augment_batch(batch, index)
        return [x_q, x_q.clone()], y


class FewEvalImages(DigitsDataModule):
    """Digits whose kNN bank and queries are the first 256 / 128 images: cheap kNN passes."""

    def eval_train_dataloader(self):
        return DataLoader(Subset(super().eval_train_dataloader().dataset, range(256)), batch_size=256)

    def eval_val_dataloader(self):
        return DataLoader(Subset(super().eval_val_dataloader().dataset, range(128)), batch_size=128)


def fit(steps: int, monitor: HealthMonitor, *, epochs: int = 1, knn: bool = False, guard: bool = False,
        datamodule: type[DigitsDataModule] = DigitsDataModule, **moco) -> dict[str, list[str]]:
    """A short fit; returns the health warnings by kind."""
    L.seed_everything(0)
    settings = dict(dim=16, queue_size=QUEUE, momentum=0.99, temperature=0.2, lr=0.05, lr_schedule="constant",
                    bn="split", bn_splits=2, cifar_stem=True) | moco
    model = MoCo("resnet18", **settings)
    callbacks = [KNNMonitor(at_start=True, k=20)] if knn else []
    callbacks += [NonFiniteLossGuard(check_every_n_steps=1)] if guard else []
    trainer = L.Trainer(max_epochs=epochs, limit_train_batches=steps, log_every_n_steps=EVERY, accelerator="cpu",
                        devices=1, logger=False, callbacks=[*callbacks, monitor], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, datamodule=datamodule(batch_size=BATCH, image_size=8))
        except NonFiniteLossError:
            pass
    kinds: dict[str, list[str]] = {}
    for w in caught:
        if issubclass(w.category, HealthWarning):
            text = str(w.message)
            kinds.setdefault(text.split("[")[1].split("]")[0], []).append(text)
    return kinds


@pytest.fixture(autouse=True)
def one_thread(_seed_and_threads):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def too_high_lr() -> dict[str, list[str]]:
    """lr 20: the embeddings collapse, the loss sits at chance, kNN falls below its init (2 epochs of 10 steps)."""
    torch.set_num_threads(1)
    return fit(10, HealthMonitor(window=2, after_steps=8, knn_patience=2), epochs=2, knn=True, lr=20.0,
               datamodule=FewEvalImages)


def test_too_high_lr_warns_collapse_not_learning_and_knn_below_init(too_high_lr):
    assert {"collapse", "not-learning", "knn-below-init"} <= set(too_high_lr)
    assert "% of chance" in too_high_lr["not-learning"][0]
    assert "1/sqrt(dim)" in too_high_lr["collapse"][0]


def test_each_kind_warns_once_in_one_line(too_high_lr):
    for kind, messages in too_high_lr.items():
        assert len(messages) == 1, kind
        assert messages[0].startswith(f"{PREFIX} [{kind}] at step ")
        assert "\n" not in messages[0] and "; usually: " in messages[0] and "; try: " in messages[0]


def test_identical_views_warn_leak():
    # a frozen encoder (lr 0): the loss check (near chance: T 0.2 over near-identical embeddings) is another test's
    kinds = fit(16, HealthMonitor(window=2, after_steps=10_000), datamodule=IdenticalViews, lr=0.0,
                bn="none")
    assert set(kinds) == {"leak"}
    assert "bn 'shuffle'" in kinds["leak"][0] and "augmentation" in kinds["leak"][0]


def test_momentum_zero_with_an_old_queue_warns_key_encoder_too_fast():
    kinds = fit(20, HealthMonitor(window=1, after_steps=10_000), momentum=0.0, queue_size=256)  # keys 15 steps old
    assert set(kinds) == {"key-encoder-too-fast"}
    assert "m 0" in kinds["key-encoder-too-fast"][0]


def test_non_finite_loss_is_said_once_and_the_guard_stops_the_run():
    kinds = fit(8, HealthMonitor(), guard=True, lr=1e30)
    assert len(kinds["not-finite"]) == 1
    assert "non-finite loss guard stopped the run" in kinds["not-finite"][0]


def test_healthy_run_raises_none():
    """m 0.99, split BN, augmented views; the loss and spread checks wait for the warm-up (the whole short run)."""
    assert fit(16, HealthMonitor(window=2), momentum=0.99, warmup_epochs=1) == {}


def test_disabled_monitor_is_silent():
    assert fit(12, HealthMonitor(enabled=False, window=1, after_steps=4), lr=20.0) == {}


def test_quiet_on_a_process_that_is_not_rank_zero(monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert fit(20, HealthMonitor(window=1, after_steps=10_000), momentum=0.0, queue_size=256) == {}


def test_thresholds_are_checked():
    with pytest.raises(ValueError, match="window=0"):
        HealthMonitor(window=0)


def test_loss_and_collapse_checks_wait_for_the_warm_up_and_a_quarter_of_the_run():
    """The digits default sits at chance and its uniformity near 0 in its first steps: no check before then."""
    from types import SimpleNamespace

    monitor = HealthMonitor()  # after_fraction 0.25
    trainer = SimpleNamespace(num_training_batches=22, accumulate_grad_batches=1, estimated_stepping_batches=660)
    no_warmup = SimpleNamespace(hparams={"warmup_epochs": 0})
    long_warmup = SimpleNamespace(hparams={"warmup_epochs": 10})
    assert not monitor._warmed_up(trainer, no_warmup, 164) and monitor._warmed_up(trainer, no_warmup, 165)
    assert not monitor._warmed_up(trainer, long_warmup, 219) and monitor._warmed_up(trainer, long_warmup, 220)
    assert HealthMonitor(after_steps=8)._warmed_up(trainer, no_warmup, 8)
    with pytest.raises(ValueError, match="after_fraction=2"):
        HealthMonitor(after_fraction=2)
