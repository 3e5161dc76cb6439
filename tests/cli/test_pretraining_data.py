"""moco-eval-knn / moco-eval-linear evaluate on the checkpoint's pretraining data unless the command line says else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from PIL import Image

from moco_lightning import MoCo
from moco_lightning.checkpointing import CHECKPOINT_KEY
from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.pretraining_data import adopt_pretraining_data, pretraining_config

REPO = Path(__file__).resolve().parents[2]


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cats", "dogs")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            image = np.full((12, 12, 3), 60 + 120 * c, dtype=np.uint8) + rng.integers(0, 20, (12, 12, 3), np.uint8)
            Image.fromarray(image).save(root / name / f"{i}.png")
    return root


def _checkpoint(path: Path, data: dict) -> Path:
    torch.manual_seed(0)
    model = MoCo(backbone="resnet18", cifar_stem=True, dim=16, queue_size=32)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    saved[CHECKPOINT_KEY] = {"config": yaml.safe_dump({"seed": 0, "data": data})}
    torch.save(saved, path)
    return path


@pytest.fixture(scope="module")
def folder_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pre")
    images = _folder(root / "photos")
    data = {"_target_": "moco_lightning.data.ImageFolderDataModule", "data_dir": str(images), "image_size": 8,
            "val_fraction": 0.5, "batch_size": 4, "num_workers": 0, "eval_batch_size": 16,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    return _checkpoint(root / "run.ckpt", data), images


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("eval_knn", overrides=overrides)


def test_without_data_options_the_pretraining_data_is_used(folder_checkpoint):
    ckpt, images = folder_checkpoint
    cfg = _compose([f"checkpoint={ckpt}", "data.num_workers=1"])
    line = adopt_pretraining_data(cfg, group_given=False, keys_given=["num_workers"])
    assert cfg.data._target_.endswith("ImageFolderDataModule") and cfg.data.data_dir == str(images)
    assert cfg.data.image_size == 8 and list(cfg.data.std) == [0.25, 0.25, 0.25]
    assert cfg.data.num_workers == 1  # the command line wins
    assert "ImageFolderDataModule" in line and "the checkpoint's pretraining data" in line


def test_another_dataset_is_evaluated_at_the_pretraining_image_size(folder_checkpoint):
    ckpt, _ = folder_checkpoint
    cfg = _compose([f"checkpoint={ckpt}", "data=digits"])
    line = adopt_pretraining_data(cfg, group_given=True, keys_given=[])
    assert cfg.data._target_.endswith("DigitsDataModule") and cfg.data.image_size == 8
    assert "another dataset, from the command line, at the pretraining image size" in line
    cfg = _compose([f"checkpoint={ckpt}", "data=digits", "data.image_size=16"])
    adopt_pretraining_data(cfg, group_given=True, keys_given=["image_size"])
    assert cfg.data.image_size == 16


def test_another_folder_keeps_the_rest_of_the_pretraining_data(folder_checkpoint, tmp_path):
    ckpt, _ = folder_checkpoint
    cfg = _compose([f"checkpoint={ckpt}", "data=imagefolder", f"data.data_dir={tmp_path}"])
    adopt_pretraining_data(cfg, group_given=True, keys_given=["data_dir"])
    assert cfg.data.data_dir == str(tmp_path) and cfg.data.image_size == 8 and cfg.data.val_fraction == 0.5


def test_a_config_composed_in_python_is_taken_as_it_is(folder_checkpoint):
    ckpt, _ = folder_checkpoint
    cfg = _compose([f"checkpoint={ckpt}"])
    assert "(as configured)" in adopt_pretraining_data(cfg)  # no Hydra run: nothing to read the command line from
    assert cfg.data._target_.endswith("DigitsDataModule")


def test_a_checkpoint_without_a_config_keeps_the_default_and_says_so(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "official.pth")
    assert pretraining_config(tmp_path / "official.pth") is None
    cfg = _compose([f"checkpoint={tmp_path / 'official.pth'}"])
    assert "stores no pretraining config" in adopt_pretraining_data(cfg, group_given=False, keys_given=[])
    assert cfg.data._target_.endswith("DigitsDataModule")


@pytest.mark.timeout(200)
def test_eval_knn_script_evaluates_an_image_folder_checkpoint_on_its_folder(folder_checkpoint, tmp_path):
    ckpt, images = folder_checkpoint
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(REPO / "eval_knn.py"), f"checkpoint={ckpt}", "k=5",
                           f"hydra.run.dir={out}"], capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"data: ImageFolderDataModule data_dir={images} image_size=8 (the checkpoint's pretraining data" in (
        proc.stdout + proc.stderr)
    result = json.loads((out / "results.json").read_text())
    assert result["dataset"] == "ImageFolderDataModule" and 0.0 <= result["knn_top1"] <= 1.0
