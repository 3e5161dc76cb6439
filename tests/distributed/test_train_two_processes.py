"""The real `python train.py` on digits with two CPU processes (Lightning's DDP, gloo), run to the end."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_train_py_on_two_processes_writes_one_run_keeps_one_queue_and_reports_knn_once(tmp_path):
    run, dumps = tmp_path / "run", tmp_path / "dumps"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    args = ["trainer.accelerator=cpu", "trainer.devices=2", "data.image_size=8", "data.batch_size=16",
            "model.queue_size=64", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
            "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0",
            "+callbacks.queue_dump._target_=queue_dump.QueueDump", f"+callbacks.queue_dump.path={dumps}",
            f"hydra.run.dir={run}"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "MoCo BN mode: shuffle (model.bn=shuffle, 2 process(es))" in output  # the recipe

    r0, r1 = (torch.load(dumps / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == r1["steps"] == 3
    assert r0["bn_mode"] == r1["bn_mode"] == "shuffle"
    # 3 steps x global batch 32 = 96 keys into K=64: pointer 32 on both ranks, one queue
    assert r0["ptr"] == r1["ptr"] == 32
    assert torch.equal(r0["queue"], r1["queue"])
    for name, value in r0["key_encoder"].items():
        if name.endswith(("weight", "bias")):  # parameters follow the same EMA on every rank
            assert torch.equal(value, r1["key_encoder"][name]), name

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len([c for c in checkpoints if c != "last.ckpt"]) == 1 and "last.ckpt" in checkpoints
    metrics = list((run).rglob("metrics.csv"))
    assert len(metrics) == 1  # rank 0 logs, rank 1 does not write a second run
    rows = list(csv.DictReader(metrics[0].open()))
    assert any(row.get("val/knn_top1") for row in rows)  # the (sharded) kNN monitor ran at the end

    # the kNN report: measured once before training (rank 0), once after (sharded over both), printed once
    assert output.count("kNN top-1 before training") == 1 and output.count("kNN top-1 on Digits") == 1
    trained = next(line for line in output.splitlines() if line.strip().startswith("trained encoder"))
    # ... and the number of one process on the same checkpoint
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moco_lightning import MoCo
    from moco_lightning.cli.train import KNNReport

    datamodule = instantiate(OmegaConf.load(run / ".hydra" / "config.yaml").data, _convert_="all")
    datamodule.setup("fit")
    model = MoCo.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu")
    top1 = KNNReport.measure(model.embed, datamodule, model)
    assert f"{100 * top1:6.1f} %" in trained, (top1, trained)
