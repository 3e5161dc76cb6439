"""``python eval_finetune.py`` / ``moco-finetune``: fine-tuning with a fraction of the labels, on 8 px digits."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn
from torchvision import models

from moco_lightning import MoCo
from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli import eval_finetune as cli
from moco_lightning.cli.config_checks import ConfigError
from moco_lightning.data import DigitsDataModule
from moco_lightning.data.labels import balanced_subset, dataset_labels
from threads import one_thread

REPO = Path(__file__).resolve().parents[2]
#: 8 px digits, one quiet CPU epoch: 142 labelled images at label_fraction=0.1 (3 steps), 360 to validate
TINY = ["data.image_size=8", "label_fraction=0.1", "trainer.max_epochs=1", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(autouse=True)
def _one_thread_per_test() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A moco-train checkpoint (ResNet-18, CIFAR stem) of an untrained MoCo."""
    torch.manual_seed(0)
    model = MoCo(backbone="resnet18", cifar_stem=True, dim=16, queue_size=32)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path_factory.mktemp("pretrained") / "moco.ckpt"
    trainer.save_checkpoint(path)
    return path


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("eval_finetune", overrides=overrides)


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(REPO / "eval_finetune.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=100)


def test_recipes_compose_with_their_defaults():
    sgd = _compose(["checkpoint=x.ckpt"])
    assert (sgd.optimizer, sgd.lr, sgd.scale_lr, sgd.momentum, sgd.nesterov, sgd.backbone_lr_factor) == (
        "sgd", 0.05, True, 0.9, True, 1.0)
    assert (sgd.weight_decay, sgd.warmup_epochs, sgd.batch_size, sgd.trainer.max_epochs) == (1e-4, 5, 64, 100)
    assert (sgd.label_fraction, sgd.label_seed, sgd.label_subset_file, sgd.ckpt_path) == (1.0, 0, None, None)
    adamw = _compose(["checkpoint=x.ckpt", "finetune_recipe=adamw"])
    assert (adamw.optimizer, adamw.lr, adamw.scale_lr, adamw.weight_decay, adamw.backbone_lr_factor) == (
        "adamw", 1e-3, False, 0.05, 0.1)


def test_the_random_backbone_takes_the_stem_of_the_image_size():
    small = _compose(["checkpoint=none", "data.image_size=8"])
    assert (small.model.backbone, small.model.cifar_stem) == ("resnet18", True)
    large = _compose(["checkpoint=none", "data=stl10", "backbone=resnet50"])
    assert (large.model.backbone, large.model.cifar_stem) == ("resnet50", False)


@pytest.fixture(scope="module")
def finetuned(checkpoint, tmp_path_factory) -> tuple[dict, L.Trainer, Path]:
    """One epoch of fine-tuning the checkpoint on 10 % of the labels, run in this process: result, Trainer, folder."""
    run = tmp_path_factory.mktemp("finetuned")
    with one_thread():
        result, trainer = cli.finetune_from_config(_compose([f"checkpoint={checkpoint}", *TINY,
                                                             f"paths.output_dir={run}"]))
    return result, trainer, run


def _indices(run: Path) -> list[int]:
    return [int(line) for line in (run / "labelled_indices.txt").read_text().splitlines() if line[0] != "#"]


def test_finetuning_a_checkpoint_exports_a_torchvision_classifier(finetuned, checkpoint):
    result, trainer, run = finetuned
    digits = DigitsDataModule(image_size=8)
    expected = balanced_subset(dataset_labels(digits.labelled_train_dataset()), 0.1, seed=0)
    assert _indices(run) == expected.tolist() and result["labelled_images"] == len(expected) == 142
    assert (result["checkpoint"], result["backbone"], result["cifar_stem"]) == (str(checkpoint), "resnet18", True)
    assert result["lr"] == pytest.approx(0.05 * 64 / 256) and result["last_epoch"] == result["best_epoch"] == 1
    assert 0.0 <= result["finetune_top1"] == result["finetune_best_top1"] <= result["finetune_top5"] <= 1.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert cli.summary(result) == (
        f"fine-tuning on DigitsDataModule (142 labelled images, label_fraction=0.1): last top-1 "
        f"{100 * result['finetune_top1']:.2f} %, best top-1 {100 * result['finetune_best_top1']:.2f} % (epoch 1)")

    # plain torchvision with the CIFAR stem swapped in loads it strictly and gives the fine-tuned model's logits
    classifier = models.resnet18(num_classes=10)
    classifier.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    classifier.maxpool = nn.Identity()
    classifier.load_state_dict(torch.load(result["classifier"], weights_only=True), strict=True)
    images = next(iter(digits.eval_val_dataloader()))[0][:16]
    finetuned_model = trainer.lightning_module.eval()
    with torch.no_grad():
        torch.testing.assert_close(classifier.eval()(images), finetuned_model(images))
    assert "resnet18(num_classes=10), then the CIFAR stem" in cli.how_to_load(result)


def test_checkpoint_none_is_the_supervised_baseline_on_the_same_labels(finetuned, tmp_path):
    result, _ = cli.finetune_from_config(_compose(["checkpoint=none", *TINY, f"paths.output_dir={tmp_path}"]))
    assert (result["checkpoint"], result["backbone"], result["cifar_stem"]) == ("none", "resnet18", True)
    assert _indices(tmp_path) == _indices(finetuned[2])  # the same label_fraction and label_seed: the same images
    assert (tmp_path / "classifier_torchvision.pth").is_file() and result["last_epoch"] == 1


def test_a_backbone_given_with_a_checkpoint_is_refused(checkpoint, monkeypatch):
    monkeypatch.setattr(cli, "_command_line_keys", lambda: ["backbone"])
    cfg = _compose([f"checkpoint={checkpoint}", "backbone=resnet50"])
    with pytest.raises(ConfigError, match=r"backbone=\.\.\. applies to checkpoint=none only.*\(resnet18\)"):
        cli.finetune_from_config(cfg)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ckpt_path_auto_resumes_the_run_after_its_last_epoch(finetuned, checkpoint, tmp_path):
    first, _, run = finetuned  # one epoch, in <run>/checkpoints/last.ckpt
    proc = _run([f"checkpoint={checkpoint}", *TINY, "trainer.max_epochs=2", "ckpt_path=auto", f"hydra.run.dir={run}"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} (after epoch 1)" in proc.stdout
    assert "fine-tuning on DigitsDataModule (142 labelled images, label_fraction=0.1): last top-1" in proc.stdout
    assert f"classifier: {run / 'classifier_torchvision.pth'}" in proc.stdout
    resumed = json.loads((run / "results.json").read_text())
    assert list(resumed["val_top1_per_epoch"]) == ["1", "2"] and resumed["last_epoch"] == 2
    assert resumed["val_top1_per_epoch"]["1"] == first["finetune_top1"]  # epoch 1 is the first run's, not redone
    assert resumed["resumed_from"] == str(run / "checkpoints" / "last.ckpt") and resumed["recipe"] == "sgd"
    with (run / "csv" / "metrics.csv").open() as f:
        validated = [int(row["epoch"]) for row in csv.DictReader(f) if row["val/acc_top1"]]
    assert validated == [0, 1]  # one validation per epoch over both runs


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_label_fraction_zero_is_one_error_line(tmp_path):
    proc = _run(["checkpoint=none", "data.image_size=8", "label_fraction=0", f"hydra.run.dir={tmp_path / 'run'}"],
                tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: label_fraction=0.0 must be in (0, 1]: 0.01 for 1 % of the labels, 1.0 for all"]


def test_a_timm_classifier_is_loaded_with_timm_create_model():
    result = {"classifier": "/run/classifier_timm.pth", "num_classes": 10, "backbone": "timm:resnet10t",
              "cifar_stem": None}
    assert "timm.create_model('resnet10t', num_classes=10); load_state_dict" in cli.how_to_load(result)
