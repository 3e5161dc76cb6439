"""The configs that say "official" compose to the official settings, value by value (REFERENCE.md)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from torchvision.transforms import v2

from global_batch import config_images_per_step
from moco_lightning.bn import SplitBatchNorm2d
from moco_lightning.cli.config_checks import check_config
from moco_lightning.data.batch_augment import RandomGaussianBlur as BatchRandomGaussianBlur
from moco_lightning.data.batch_augment import RandomResizedCrop as BatchRandomResizedCrop
from moco_lightning.optim import scaled_lr
from moco_lightning.transforms import CIFAR10_MEAN, CIFAR10_STD, GaussianBlur


def _ops(transform):
    """The transforms of a v2.Compose, RandomApply unwrapped: [(op, p)]."""
    out = []
    for t in transform.transforms:
        if isinstance(t, v2.RandomApply):
            out += [(inner, t.p) for inner in t.transforms]
        else:
            out.append((t, 1.0))
    return out


@pytest.mark.parametrize("data", ["cifar10", "cifar100"])
def test_cifar_experiment_is_the_official_demo(compose_train, data):
    cfg = compose_train(["experiment=cifar10_mocov2", f"data={data}"])
    check_config(cfg)
    model = cfg.model
    assert model.backbone == "resnet18" and model.cifar_stem is True and model.mlp is False
    assert (model.dim, model.queue_size, model.momentum, model.temperature) == (128, 4096, 0.99, 0.1)
    assert (model.bn, model.bn_splits, model.symmetric) == ("split", 8, False)
    assert model.optimizer == "sgd" and model.sgd_momentum == 0.9 and model.weight_decay == pytest.approx(5e-4)
    assert (model.lr_schedule, model.lr_interval, model.warmup_epochs) == ("cosine", "epoch", 0)
    assert cfg.data.batch_size == 512 and config_images_per_step(cfg) == 512
    assert scaled_lr(model.lr, 512) == pytest.approx(0.06)
    assert cfg.trainer.max_epochs == 200 and cfg.trainer.devices == 1
    assert cfg.callbacks.knn.features == "embedding" and cfg.callbacks.knn.k == 200
    assert cfg.callbacks.knn.temperature == pytest.approx(0.1)

    datamodule = instantiate(cfg.data, _convert_="all")
    if data == "cifar10":
        assert (datamodule.mean, datamodule.std) == (CIFAR10_MEAN, CIFAR10_STD)  # the demo's normalisation
    # the batched path on the device (the default) is built from the same per-image recipe
    batched = datamodule.batch_augment
    assert datamodule.batch_augmentation and batched.crop_on_device
    for view in (batched.view_1, batched.view_2):
        crops = [op for op in view.ops if isinstance(op, BatchRandomResizedCrop)]
        assert len(crops) == 1 and crops[0].scale == (0.08, 1.0) and crops[0].size == 32
        assert not any(isinstance(op, BatchRandomGaussianBlur) for op in view.ops)  # no blur
    datamodule.batch_augmentation = False  # the per-image recipe itself
    pair = datamodule.pretrain_transform
    view_1, view_2 = pair.transform_1, pair.transform_2
    assert view_1 is view_2
    ops = _ops(view_1)
    crop = next(op for op, _ in ops if isinstance(op, v2.RandomResizedCrop))
    assert crop.size == [32] or tuple(crop.size) == (32, 32)
    assert tuple(crop.scale) == (0.08, 1.0) and tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3))
    jitter, p_jitter = next((op, p) for op, p in ops if isinstance(op, v2.ColorJitter))
    assert p_jitter == 0.8
    assert [tuple(getattr(jitter, a)) for a in ("brightness", "contrast", "saturation")] == [(0.6, 1.4)] * 3
    assert tuple(jitter.hue) == pytest.approx((-0.1, 0.1))
    assert next(op.p for op, _ in ops if isinstance(op, v2.RandomGrayscale)) == 0.2
    assert next(op.p for op, _ in ops if isinstance(op, v2.RandomHorizontalFlip)) == 0.5
    assert all(p == 0.0 for op, p in ops if isinstance(op, GaussianBlur))  # no blur

    net = instantiate(cfg.model, _convert_="all")
    net.configure_bn(1)
    head = net.encoder_q.head
    assert len(head) == 1 and isinstance(head[0], torch.nn.Linear) and head[0].weight.shape == (128, 512)
    backbone = net.encoder_q.backbone
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    split = [m for m in net.encoder_k.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert split and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 8 for m in split)


def test_imagenet_mocov2_experiment_is_the_official_recipe(compose_train):
    cfg = compose_train(["experiment=imagenet_mocov2", "data.data_dir=/datasets/imagenet"])
    model = cfg.model
    assert model.backbone == "resnet50" and model.cifar_stem is False and model.mlp is True
    assert (model.dim, model.queue_size, model.momentum, model.temperature) == (128, 65536, 0.999, 0.2)
    assert (model.lr_schedule, model.lr_interval, model.bn) == ("cosine", "epoch", "auto")  # auto: shuffle on 8
    assert config_images_per_step(cfg) == 256 and scaled_lr(model.lr, 256) == pytest.approx(0.03)
    assert model.weight_decay == pytest.approx(1e-4) and cfg.trainer.max_epochs == 200
    assert cfg.data.augmentation == "v2"


def test_mocov1_model_is_the_official_v1_recipe(compose_train):
    model = compose_train(["model=mocov1", "data=imagenet", "backbone=resnet50", "trainer.devices=8",
                           "data.data_dir=/x"]).model
    assert model.mlp is False and model.temperature == pytest.approx(0.07)
    assert (model.lr_schedule, model.lr_interval, list(model.lr_milestones)) == ("step", "epoch", [120, 160])
