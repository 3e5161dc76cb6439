"""The real `python train.py` on digits with two CPU processes (Lightning's DDP, gloo), as a sweep of two jobs.

``-m`` with ``trainer.devices=2``: Lightning starts each job's second process again from the command line, which
used to be the whole sweep's (every second process ran the sweep on its own and joined whichever job rank 0 was
in). Each job must train once, both its processes with its own settings, one queue, one run folder and one kNN
table, equal to what one process measures on the job's checkpoint.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .queue_dump import assert_one_run_on_both_ranks

REPO = Path(__file__).resolve().parents[2]
MOMENTA = (0.9, 0.99)  # the sweep: one job each


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_sweep_of_two_process_jobs_trains_each_job_once_with_its_own_settings(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    args = ["-m", f"model.momentum={','.join(map(str, MOMENTA))}", "trainer.accelerator=cpu", "trainer.devices=2",
            "data.image_size=8", "data.batch_size=16", "model.queue_size=64", "trainer.max_epochs=1",
            "trainer.limit_train_batches=3", "trainer.log_every_n_steps=1", "callbacks.progress_bar.refresh_rate=0",
            "+callbacks.queue_dump._target_=queue_dump.QueueDump",
            "+callbacks.queue_dump.path=${hydra:runtime.output_dir}/dumps", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=280)
    finally:
        if proc.poll() is None:  # a hang (it did, before each job's processes ran that job alone): all of them
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, output[-3000:]
    assert output.count("Launching 2 jobs locally") == 1  # the second processes did not start the sweep again
    assert output.count("MoCo BN mode: shuffle (bn=shuffle, 2 process(es))") == 2  # the recipe, per job

    for job, momentum in enumerate(MOMENTA):
        run = sweep / str(job)
        r0, r1 = assert_one_run_on_both_ranks(run / "dumps")
        assert r0["hparams"]["momentum"] == r1["hparams"]["momentum"] == momentum  # the job's settings on both
        checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
        assert len([c for c in checkpoints if c != "last.ckpt"]) == 1 and "last.ckpt" in checkpoints
        metrics = list(run.rglob("metrics.csv"))
        assert len(metrics) == 1  # rank 0 logs, rank 1 does not write a second run
        assert any(row.get("val/knn_top1") for row in csv.DictReader(metrics[0].open()))  # the sharded monitor

    # the kNN report of each job: measured once before training (rank 0), once after (sharded), printed once
    assert output.count("kNN top-1 before training") == 2 and output.count("kNN top-1 on Digits") == 2
    # its encoder-at-init row is the kNN monitor's pass at step 0 (sharded over both processes), not a second pass
    assert output.count("the encoder at init: the kNN monitor's first pass") == 2
    first_init = [line for line in output.splitlines() if line.strip().startswith("encoder at init")][0]
    rows = list(csv.DictReader(next((sweep / "0").rglob("metrics.csv")).open()))
    logged = [float(row["val/knn_top1_init"]) for row in rows if row.get("val/knn_top1_init")]
    assert len(logged) == 1 and f"{100 * logged[0]:6.1f} %" in first_init, (logged, first_init)
    trained = next(line for line in output.splitlines() if line.strip().startswith("trained encoder"))
    # ... and the number of one process on the same checkpoint (the first job's)
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from moco_lightning import MoCo
    from moco_lightning.cli.train import KNNReport

    datamodule = instantiate(OmegaConf.load(sweep / "0" / ".hydra" / "config.yaml").data, _convert_="all")
    datamodule.setup("fit")
    model = MoCo.load_from_checkpoint(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu")
    top1 = KNNReport.measure(model.embed, datamodule, model)
    assert f"{100 * top1:6.1f} %" in trained, (top1, trained)
