"""FineTuner and finetune(): every layer trains, BN in train mode, two lr groups, best and last tracked, export."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import lightning as L
import pytest
import torch
from eval_helpers import NUM_CLASSES, BlobsDataModule, tiny_trainer
from torch import nn
from torchvision import models

from moco_lightning.backbones import build_backbone
from moco_lightning.eval import FineTuner, finetune, torchvision_model
from moco_lightning.eval.finetune import HISTORY_KEY, export_classifier, resnet_arch, train_finetuner
from threads import one_thread


@pytest.fixture(autouse=True)
def _one_thread_per_test() -> Iterator[None]:
    with one_thread():
        yield


def _resnet() -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    return build_backbone("resnet18", cifar_stem=True)


class _Watch(L.Callback):
    """Records, during training, the BN modes, which parameters got a gradient, and the lr of each group."""

    def __init__(self) -> None:
        self.bn_training: list[bool] = []
        self.without_grad: set[str] = set()
        self.lrs: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.bn_training += [m.training for m in pl_module.modules() if isinstance(m, nn.BatchNorm2d)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.without_grad |= {n for n, p in pl_module.named_parameters()
                              if p.grad is None or not torch.any(p.grad != 0)}
        self.lrs.append(tuple(group["lr"] for group in optimizer.param_groups))


@pytest.fixture(scope="module")
def fitted() -> tuple[FineTuner, dict, _Watch, dict]:
    """Two epochs of SGD fine-tuning on the blobs (4 steps an epoch), with a 1-epoch warm-up."""
    backbone, dim = _resnet()
    before = copy.deepcopy(backbone.state_dict())
    backbone.eval()  # as load_backbone returns a pretrained one: fine-tuning must still train its BN
    model = FineTuner(backbone, dim, NUM_CLASSES, lr=0.1, backbone_lr_factor=0.1, warmup_epochs=1)
    watch = _Watch()
    trainer = tiny_trainer(max_epochs=2, callbacks=[watch], num_sanity_val_steps=0)
    with one_thread():
        result = train_finetuner(model, BlobsDataModule(), trainer)
    return model, result, watch, before


def test_every_parameter_trains_and_bn_runs_in_train_mode(fitted):
    model, _, watch, before = fitted
    assert watch.bn_training and all(watch.bn_training)  # nothing kept in eval mode
    assert watch.without_grad == set()  # the backbone's parameters too, BN affine and stem included
    after = model.backbone.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k]) and not k.endswith("num_batches_tracked")]
    assert len(moved) == len(before) - sum(k.endswith("num_batches_tracked") for k in before)  # weights and BN stats


def test_classifier_and_backbone_have_their_own_lr_and_the_schedule_warms_up_then_decays(fitted):
    model, _, watch, _ = fitted
    groups = model.param_groups()
    assert [g["name"] for g in groups] == ["backbone", "classifier"]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.fc.parameters()}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
    backbone_lr, classifier_lr = zip(*watch.lrs)
    for b, c in watch.lrs:  # backbone = classifier x 0.1 at every step
        assert b == pytest.approx(0.1 * c)
    assert classifier_lr[0] == 0.0 and classifier_lr[1:4] == pytest.approx([0.025, 0.05, 0.075])  # 4 steps of warm-up
    assert classifier_lr[4] == pytest.approx(0.1)  # then the cosine from its peak
    assert classifier_lr[5:] == pytest.approx([0.05 * (1 + math.cos(math.pi * k / 4)) for k in (1, 2, 3)])
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["nesterov"] is True


def test_best_and_last_are_tracked_and_saved_in_checkpoints(fitted):
    model, result, _, _ = fitted
    assert sorted(model.val_history) == [0, 1]
    top1 = {e: acc[0] for e, acc in model.val_history.items()}
    assert result["history"] == top1 and result["last_epoch"] == 1 and result["top1"] == top1[1]
    assert result["best_top1"] == max(top1.values()) and top1[result["best_epoch"]] == result["best_top1"]
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    restored = FineTuner(*_resnet(), NUM_CLASSES)
    restored.on_load_checkpoint(checkpoint)
    assert restored.val_history == model.val_history and set(checkpoint[HISTORY_KEY]) == {0, 1}


def test_ties_keep_the_earliest_best_epoch():
    model = FineTuner(nn.Flatten(), 3, 2)
    model.val_history = {0: (0.5, 1.0), 1: (0.7, 1.0), 2: (0.7, 1.0), 3: (0.6, 1.0)}
    assert model.best() == (0.7, 1) and model.last() == (0.6, 1.0, 3)


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050", "test_convnext"])
def test_a_timm_backbone_exports_what_timm_create_model_loads(name, tmp_path):
    import timm

    torch.manual_seed(0)
    backbone, dim = build_backbone(f"timm:{name}")
    model = FineTuner(backbone, dim, NUM_CLASSES)
    with torch.no_grad():
        model.fc.weight.normal_()  # a classifier that is not its zero-initialised self
        model.fc.bias.normal_()
    path = export_classifier(model, tmp_path)
    assert path.name == "classifier_timm.pth"
    plain = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    plain.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x))


def test_torchvision_export_is_the_whole_classifier(fitted, tmp_path):
    model, _, _, _ = fitted
    assert resnet_arch(model.backbone) == ("resnet18", True)
    path = export_classifier(model, tmp_path)
    assert path.name == "classifier_torchvision.pth"
    state = torch.load(path, weights_only=True)
    plain = models.resnet18(num_classes=NUM_CLASSES)  # the stem surgery by hand, then a strict load
    plain.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    plain.maxpool = nn.Identity()
    plain.load_state_dict(state, strict=True)
    ours = torchvision_model("resnet18", cifar_stem=True, num_classes=NUM_CLASSES)
    ours.load_state_dict(state, strict=True)
    x = torch.randn(5, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x))
        torch.testing.assert_close(ours.eval()(x), model(x))


def test_vit_exports_as_a_timm_classifier(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_small", image_size=8, patch_size=4, freeze_patch_embed=True)
    model = FineTuner(backbone, dim, 3).eval()
    assert all(p.requires_grad for p in model.parameters())  # the frozen patch projection trains here
    with pytest.raises(ValueError, match="no torchvision ResNet state dict; use deit_state_dict"):
        model.torchvision_state_dict()
    path = export_classifier(model, tmp_path)
    timm_vit = VisionTransformer(img_size=8, patch_size=4, embed_dim=384, depth=12, num_heads=12, num_classes=3)
    timm_vit.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.eval()(x), model(x), rtol=1e-4, atol=1e-5)


def test_adamw_and_finetune_from_a_backbone_name():
    dm = BlobsDataModule()
    result, model = finetune(datamodule=dm, backbone="resnet18", cifar_stem=True, optimizer="adamw", lr=1e-3,
                             scale_lr=False, backbone_lr_factor=0.1, weight_decay=0.05, warmup_epochs=0,
                             trainer=tiny_trainer(max_epochs=1, limit_train_batches=2, num_sanity_val_steps=0))
    optimizer = model.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.05
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    assert dm.augment_calls[0] is True  # trained on the augmented view
    assert resnet_arch(model.backbone) == ("resnet18", True) and result["last_epoch"] == 0


def test_finetune_scales_the_lr_by_the_batch():
    _, model = finetune(datamodule=BlobsDataModule(batch_size=16), backbone="resnet18", cifar_stem=True, lr=0.05,
                        trainer=tiny_trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                                             num_sanity_val_steps=0))
    assert model.hparams.lr == pytest.approx(0.05 * 16 / 256)


def test_a_batch_of_one_image_is_skipped_when_bn_trains():
    model = FineTuner(*_resnet(), NUM_CLASSES)
    with pytest.warns(UserWarning, match="skips a training batch of one image"):
        assert model.training_step((torch.randn(1, 3, 8, 8), torch.tensor([0])), 0) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optimizer": "adam"}, "optimizer='adam' is not one of sgd, adamw"),
    ({"lr": 0.0}, "lr=0.0 must be a positive number"),
    ({"backbone_lr_factor": -1.0}, "backbone_lr_factor=-1.0 must be"),
    ({"momentum": 0.0}, "nesterov=true needs momentum > 0"),
    ({"label_smoothing": 1.0}, "label_smoothing=1.0 must be in"),
])
def test_settings_out_of_range_are_one_line_errors_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FineTuner(nn.Flatten(), 3, 2, **kwargs)
