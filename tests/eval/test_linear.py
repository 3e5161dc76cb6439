import pytest
import torch
from eval_helpers import NUM_CLASSES, BlobsDataModule, make_blobs, tiny_trainer

from moco_lightning.backbones import build_backbone
from moco_lightning.eval.linear import LinearProbe, linear_eval

FAST = dict(accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)


def _probe(**kwargs) -> LinearProbe:
    backbone, dim = build_backbone("resnet18", cifar_stem=True)
    return LinearProbe(backbone, dim, NUM_CLASSES, **kwargs)


def test_defaults_are_the_official_protocol():
    probe = _probe()
    hp = probe.hparams
    assert (hp.lr, hp.momentum, hp.weight_decay, hp.schedule, tuple(hp.milestones), hp.gamma) == (
        30.0,
        0.9,
        0.0,
        "step",
        (60, 80),
        0.1,
    )
    assert torch.count_nonzero(probe.fc.bias) == 0
    assert probe.fc.weight.std().item() == pytest.approx(0.01, rel=0.2)
    assert abs(probe.fc.weight.mean().item()) < 0.002


def test_backbone_is_frozen_and_stays_in_eval_mode():
    probe = _probe()
    probe.train()
    assert not probe.backbone.training and probe.fc.training
    assert not any(p.requires_grad for p in probe.backbone.parameters())
    logits = probe(make_blobs(8, seed=0)[0])
    logits.sum().backward()
    assert all(p.grad is None for p in probe.backbone.parameters()) and probe.fc.weight.grad is not None


def test_optimizer_trains_only_the_classifier_with_the_step_schedule():
    probe = _probe(milestones=(2, 3))
    config = probe.configure_optimizers()
    params = [p for group in config["optimizer"].param_groups for p in group["params"]]
    assert len(params) == 2 and params[0] is probe.fc.weight and params[1] is probe.fc.bias
    scheduler = config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(config["optimizer"].param_groups[0]["lr"])
        config["optimizer"].step()
        scheduler.step()
    assert lrs == pytest.approx([30.0, 30.0, 3.0, 0.3])


def test_cosine_schedule_decays_to_zero():
    probe = _probe(schedule="cosine", max_epochs=4)
    config = probe.configure_optimizers()
    opt, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(4):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)


def test_unknown_schedule_names_the_setting():
    with pytest.raises(ValueError, match="schedule="):
        _probe(schedule="linear")


def test_best_epoch_is_the_highest_validation_top1_and_the_earliest_on_ties():
    probe = LinearProbe(torch.nn.Identity(), 4, 2)
    probe.val_history = {0: 0.5, 1: 0.75, 2: 0.75, 3: 0.6}
    assert probe.best() == (0.75, 1)
    with pytest.raises(RuntimeError, match="no validation epoch"):
        LinearProbe(torch.nn.Identity(), 4, 2).best()


def test_sanity_check_catches_a_changed_bn_statistic():
    probe = _probe()
    probe.check_backbone_unchanged()  # untouched: passes
    with torch.no_grad():
        probe.backbone.layer2[0].bn1.running_mean += 0.5
    with pytest.raises(RuntimeError, match=r"'layer2\.0\.bn1\.running_mean' changed"):
        probe.check_backbone_unchanged()


class _LeakyProbe(LinearProbe):
    """A broken probe that lets the backbone's BN run in train mode: the check must catch it."""

    def on_train_epoch_start(self) -> None:
        self.backbone.train()


@pytest.mark.timeout(120)
def test_sanity_check_after_the_first_epoch_fails_training_whose_bn_statistics_moved():
    backbone, dim = build_backbone("resnet18", cifar_stem=True)
    probe = _LeakyProbe(backbone, dim, NUM_CLASSES)
    dm = BlobsDataModule()
    with pytest.raises(RuntimeError, match=r"sanity check failed: backbone 'bn1\.running_mean' changed"):
        tiny_trainer(max_epochs=2).fit(probe, train_dataloaders=dm.eval_train_dataloader())


@pytest.mark.timeout(120)
def test_linear_eval_from_a_checkpoint_checks_against_the_checkpoint_weights(moco_checkpoint):
    _, path = moco_checkpoint
    dm = BlobsDataModule()
    result = linear_eval(path, dm, epochs=2, milestones=(1,), trainer_kwargs=FAST)
    assert dm.augment_calls == [True]  # trained on the augmented linear-probe view
    assert set(result) == {"top1", "top5", "best_top1", "best_epoch"}
    assert result["top1"] > 1.5 / NUM_CLASSES and result["top5"] == 1.0
    assert result["best_top1"] >= result["top1"] and result["best_epoch"] in (0, 1)


@pytest.mark.timeout(180)
def test_linear_probe_on_digits_reaches_well_above_chance():
    from moco_lightning.data import DigitsDataModule

    # a tiny random conv net: its frozen features already separate the digits linearly
    backbone = torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3, padding=1),
        torch.nn.BatchNorm2d(64),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(),
    )
    dm = DigitsDataModule(batch_size=64, image_size=8, seed=0)
    result = linear_eval(
        backbone=backbone,
        feature_dim=256,
        datamodule=dm,
        epochs=2,
        milestones=(1,),
        augment_train=False,
        trainer_kwargs=FAST,
    )
    assert result["top1"] > 0.5  # chance is 0.1 on the 10 digit classes (measured: 0.71)
    assert result["top5"] > result["top1"]
