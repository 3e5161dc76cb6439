"""The embedding map and the diagnostics are extras: on a tiny validation split they skip with one line, and the
run finishes; when they can draw, the map's legend names the classes."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from moco_lightning import MoCo
from moco_lightning.data import ImageFolderDataModule
from moco_lightning.eval import embedding_map as embedding_map_module
from moco_lightning.eval.diagnostics_monitor import DiagnosticsMonitor
from moco_lightning.eval.embedding_map import EmbeddingMap
from moco_lightning.eval.knn import KNNMonitor


def _folder(root: Path, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _fit(tmp_path: Path, val_fraction: float, knn: bool = False) -> tuple[L.Trainer, EmbeddingMap, list[str]]:
    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = ImageFolderDataModule(data_dir=str(_folder(tmp_path / "images")), val_fraction=val_fraction, batch_size=8,
                               num_workers=0, image_size=8)
    model = MoCo("resnet18", dim=8, queue_size=16, lr=0.01, lr_schedule="constant", cifar_stem=True,
                 bn_splits=2)
    emap = EmbeddingMap(dirpath=str(tmp_path / "maps"), every_n_runs=0, method="pca", max_points=50)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", devices=1, logger=False,
                        callbacks=[*([KNNMonitor(k=5)] if knn else []),
                                   DiagnosticsMonitor(every_n_epochs=1, max_samples=50), emap],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, datamodule=dm)
    return trainer, emap, [str(w.message) for w in caught]


@pytest.mark.timeout(120)
def test_a_map_of_two_validation_images_is_skipped_with_one_line(tmp_path):
    trainer, emap, messages = _fit(tmp_path, val_fraction=0.1)  # 20 images: 2 held out
    assert trainer.global_step == 1 and trainer.state.finished
    skipped = [m for m in messages if "embedding map final.png skipped" in m]
    assert len(skipped) == 1 and "2 validation image(s); a map needs at least 3" in skipped[0]
    assert emap.last_path is None and emap.skipped is not None


@pytest.mark.timeout(120)
def test_no_validation_images_skips_the_knn_monitor_the_diagnostics_and_the_map(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        trainer, emap, messages = _fit(tmp_path, val_fraction=0.0, knn=True)
    assert trainer.state.finished and "val/knn_top1" not in trainer.callback_metrics
    assert caplog.text.count("kNN monitor: skipped (ImageFolderDataModule: no validation images") == 1
    assert len([m for m in messages if "val/alignment and val/uniformity skipped" in m]) == 1
    assert len([m for m in messages if "embedding map final.png skipped" in m]) == 1


@pytest.mark.timeout(120)
def test_the_legend_names_the_classes(tmp_path, monkeypatch):
    seen = {}
    original = embedding_map_module.embedding_map_figure

    def record(coords, labels, title="", class_names=None):
        seen["class_names"], seen["labels"] = class_names, np.asarray(labels)
        return original(coords, labels, title, class_names=class_names)

    monkeypatch.setattr(embedding_map_module, "embedding_map_figure", record)
    _, emap, _ = _fit(tmp_path, val_fraction=0.25)  # 5 validation images
    assert emap.last_path is not None and emap.last_path.is_file()
    assert seen["class_names"] == ["cats", "dogs"] and set(seen["labels"].tolist()) == {0, 1}
