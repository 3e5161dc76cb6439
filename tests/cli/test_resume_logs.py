"""A run killed twice with SIGKILL and resumed with ckpt_path=auto: its metrics.csv holds every logged step once."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from .conftest import TRAIN_PY

pytestmark = pytest.mark.slow

#: 2 epochs x 3 steps on 8 px digits, a step checkpoint every 2 steps, every metric logged at every step.
RUN = ["data.image_size=8", "data.batch_size=16", "model.queue_size=48", "trainer.max_epochs=2",
       "trainer.limit_train_batches=3", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
       "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0", "knn_report=false",
       "callbacks.step_checkpoint.every_n_train_steps=2", "~callbacks.embedding_map"]
HELPERS = Path(__file__).resolve().parent


def _launch(run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, str(TRAIN_PY), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=200)


def _kill_after(step: int) -> list[str]:
    return ["+callbacks.kill._target_=kill_helpers.SignalAt", f"+callbacks.kill.after_step={step}"]


@pytest.mark.timeout(600)
def test_every_logged_step_is_in_the_csv_once_after_two_kills(tmp_path):
    run = tmp_path / "run"
    first = _launch(run, *_kill_after(3))  # killed mid-epoch 1, after the step-2 checkpoint and the epoch end
    assert first.returncode == -9, first.stderr[-2000:]
    second = _launch(run, "ckpt_path=auto", *_kill_after(5))  # resumes at 3, killed after step 5
    assert second.returncode == -9, second.stderr[-2000:]
    third = _launch(run, "ckpt_path=auto")
    assert third.returncode == 0, third.stderr[-2000:]
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    losses = Counter(int(row["step"]) for row in rows if row["train/loss"])
    assert losses == Counter(range(6)), losses  # steps 0-5, each once
    assert Counter(int(row["step"]) for row in rows if row["lr-SGD"]) == Counter(range(6))
    assert [int(row["step"]) for row in rows if row["val/knn_top1"]] == [2, 5]  # both epoch ends
    steps = [int(row["step"]) for row in rows]
    assert steps == sorted(steps)
