from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from moco_lightning.cli import CONFIG_PATH

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "train.py"


@pytest.fixture
def compose_train(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with overrides, outputs under tmp_path (no Hydra run needed)."""

    def _compose(overrides: Sequence[str] = (), return_hydra_config: bool = False) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
            return compose("train", overrides=[f"paths.output_dir={tmp_path}", *overrides],
                           return_hydra_config=return_hydra_config)

    return _compose


def run_train(args: Sequence[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run `python train.py args...` in a subprocess with one CPU thread and offline loggers."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(TRAIN_PY), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


#: A training run of a couple of steps on 8 px digits: small batch, small queue, one epoch.
TINY = ["data.image_size=8", "data.batch_size=16", "model.queue_size=48", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
        "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0",
        "callbacks.embedding_map.method=pca"]  # t-SNE is tested on its own; PCA keeps the many tiny runs short
