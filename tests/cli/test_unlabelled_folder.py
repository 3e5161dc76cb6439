"""`python train.py` on a folder of images without class folders: trains to the end, exit 0, no kNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import run_train

pytestmark = pytest.mark.slow


def _write_flat_folder(folder: Path, count: int = 36, size: int = 12) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"photo{i:02d}.png")
    return folder


@pytest.mark.timeout(300)
def test_flat_folder_trains_with_label_free_diagnostics_only(tmp_path):
    images = _write_flat_folder(tmp_path / "photos")
    out = tmp_path / "run"
    args = ["data=imagefolder", f"data.data_dir={images}", "data.image_size=8", "data.batch_size=16",
            "data.num_workers=0", "model.queue_size=32", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.log_every_n_steps=1", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
            "callbacks.progress_bar.refresh_rate=0", "callbacks.embedding_map.method=pca", f"hydra.run.dir={out}"]
    result = run_train(args, cwd=tmp_path, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    for line in ("kNN monitor: the images have no labels", "knn_report: the images have no labels",
                 "no best-by-val/knn_top1 checkpoint", "embedding map: the images have no labels"):
        assert text.count(line) == 1, (line, text[-3000:])
    assert "could not find the monitored key" not in text and "error" not in result.stderr.lower()
    assert "trained encoder" not in result.stdout  # no kNN table without labels
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["last.ckpt"]
    header = (out / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for metric in ("dictionary/key_drift", "dictionary/key_age_max", "dictionary/sim_gap", "val/alignment",
                   "val/uniformity", "train/loss"):
        assert metric in header, header
    assert not any(name.startswith("val/knn") for name in header)
    assert (out / "embedding_maps" / "final.png").is_file()
