"""`python train.py backbone=resnet50 trainer.devices=8` composes to an 8-process DDP run with the official
MoCo v2 settings and the lr scaled to the global batch; checked without a GPU."""

from __future__ import annotations

import lightning as L
import pytest
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy

from global_batch import config_images_per_step
from moco_lightning.cli.config_checks import check_config
from moco_lightning.optim import scaled_lr

FLAGSHIP = ["backbone=resnet50", "trainer.devices=8"]


def test_flagship_is_eight_device_ddp_with_resnet50(compose_train):
    cfg = compose_train(FLAGSHIP)
    assert cfg.trainer.devices == 8 and cfg.trainer.strategy == "auto"  # Lightning's auto: DDP (built below)
    assert cfg.trainer.sync_batchnorm is False and cfg.model.bn == "auto"
    assert cfg.model.backbone == "resnet50"


def test_flagship_uses_the_official_mocov2_settings(compose_train):
    model = compose_train(FLAGSHIP).model
    assert (model.dim, model.queue_size, model.momentum, model.temperature) == (128, 65536, 0.999, 0.2)
    assert model.mlp is True and model.lr_schedule == "cosine" and model.weight_decay == pytest.approx(1e-4)
    assert model.lr == pytest.approx(0.03) and model.scale_lr is True


def test_flagship_lr_is_scaled_to_the_global_batch(compose_train):
    cfg = compose_train(FLAGSHIP)
    check_config(cfg)
    assert config_images_per_step(cfg) == cfg.data.batch_size * 8
    assert scaled_lr(cfg.model.lr, config_images_per_step(cfg)) == pytest.approx(0.03 * cfg.data.batch_size * 8 / 256)


def test_flagship_on_imagenet_is_the_official_batch_and_lr(compose_train):
    cfg = compose_train([*FLAGSHIP, "data=imagenet"])
    assert cfg.data.batch_size == 32 and config_images_per_step(cfg) == 256
    assert scaled_lr(cfg.model.lr, config_images_per_step(cfg)) == pytest.approx(0.03)
    assert cfg.trainer.max_epochs == 200 and cfg.model.cifar_stem is False


def test_flagship_builds_an_eight_process_ddp_trainer(compose_train):
    cfg = compose_train([*FLAGSHIP, "trainer.accelerator=cpu"])  # the same Trainer, on CPU processes
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    assert isinstance(trainer, L.Trainer)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.world_size == 8


def test_one_device_is_not_ddp_and_several_nodes_are(compose_train):
    def strategy(overrides):
        cfg = compose_train([*overrides, "trainer.accelerator=cpu"])
        return instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False).strategy

    assert not isinstance(strategy([]), DDPStrategy)
    assert isinstance(strategy(["trainer.num_nodes=2"]), DDPStrategy)
