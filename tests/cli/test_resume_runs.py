"""Exact resume of real `python train.py` processes: killed with SIGKILL or stopped by SIGTERM, then resumed.

One uninterrupted reference run, and interrupted runs of the same command that are resumed: each must end with
the same weights, queue and pointer, optimizer state, lr schedule position and random generator states as the
reference, bit for bit (CPU, one thread, seeded: every op here is deterministic). The runs are shared by the
tests below (two at a time) and their checkpoint files deleted at the end.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import TRAIN_PY

pytestmark = pytest.mark.slow

#: 2 epochs x 3 steps on 8 px digits, a checkpoint after every step (callbacks.step_checkpoint) and last.ckpt at
#: every epoch end. The kNN monitor and its best checkpoint are off to save time (it draws no random numbers).
RUN = ["data.image_size=8", "data.batch_size=16", "model.queue_size=48", "trainer.max_epochs=2",
       "trainer.limit_train_batches=3", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
       "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0", "knn_report=false",
       "callbacks.step_checkpoint.every_n_train_steps=1", "~callbacks.knn", "~callbacks.model_checkpoint"]
HELPERS = Path(__file__).resolve().parent  # kill_helpers.SignalAt: the process signals itself at a chosen step


def _signal_at(after_step: int, signal_name: str) -> list[str]:
    return ["+callbacks.kill._target_=kill_helpers.SignalAt", f"+callbacks.kill.after_step={after_step}",
            f"+callbacks.kill.signal_name={signal_name}"]


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(TRAIN_PY), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(*processes: subprocess.Popen) -> list[tuple[int, str]]:
    """Wait for each process (240 s at most); on a timeout or any error kill them all."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=240)
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Reference, SIGKILL'd and SIGTERM'd runs and their resumptions, two processes at a time."""
    root = tmp_path_factory.mktemp("resume")
    d = {name: root / name for name in ("reference", "killed", "mid_epoch", "corrupt", "terminated")}
    out = {}
    # wave 1: the reference; a run killed with SIGKILL after step 5 (mid-epoch 1: 2 of its 3 steps done)
    (out["reference"], out["killed"]) = _wait(_start(d["reference"]), _start(d["killed"], *_signal_at(5, "SIGKILL")))
    # wave 2: resume the SIGKILL'd run mid-epoch from its step checkpoint; a run stopped by SIGTERM after step 4
    # (the step in progress, 5, finishes and is saved; exit status 143)
    mid = _start(d["mid_epoch"], f"ckpt_path={d['killed'] / 'checkpoints' / 'step00000005.ckpt'}")
    out["mid_epoch"], out["terminated"] = _wait(mid, _start(d["terminated"], *_signal_at(4, "SIGTERM")))
    out["terminated_checkpoints"] = sorted(p.name for p in (d["terminated"] / "checkpoints").iterdir())
    out["terminated_step"] = _load(d["terminated"] / "checkpoints" / "last.ckpt")["global_step"]
    # the corrupt case gets links to the killed run's files, its newest (step 5) replaced by a truncated copy
    (d["corrupt"] / "checkpoints").mkdir(parents=True)
    for path in (d["killed"] / "checkpoints").glob("*.ckpt"):
        if path.name == "step00000005.ckpt":
            (d["corrupt"] / "checkpoints" / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        else:
            os.link(path, d["corrupt"] / "checkpoints" / path.name)
    # wave 3: auto-resume over the corrupt newest checkpoint; auto-resume of the SIGTERM'd run
    out["corrupt"], out["terminated_resumed"] = _wait(_start(d["corrupt"], "ckpt_path=auto"),
                                                      _start(d["terminated"], "ckpt_path=auto"))
    finals = {name: _load(d[name] / "checkpoints" / "last.ckpt") for name in ("reference", "mid_epoch", "corrupt",
                                                                              "terminated")}
    losses = {name: _losses(d[name]) for name in ("reference", "mid_epoch")}
    yield out, finals, losses
    shutil.rmtree(root, ignore_errors=True)  # about 2 GB of ResNet-18 checkpoints


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _losses(run_dir: Path) -> dict[int, str]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return {int(row["step"]): row["train/loss"] for row in csv.DictReader(handle) if row.get("train/loss")}


def _assert_same_end(resumed: dict, reference: dict) -> None:
    assert resumed["global_step"] == reference["global_step"] == 6
    for key, value in reference["state_dict"].items():  # both encoders, BN statistics, queue and pointer
        assert torch.equal(resumed["state_dict"][key], value), key
    for index, state in reference["optimizer_states"][0]["state"].items():  # SGD momentum buffers
        assert torch.equal(resumed["optimizer_states"][0]["state"][index]["momentum_buffer"],
                           state["momentum_buffer"]), index
    assert resumed["optimizer_states"][0]["param_groups"][0]["lr"] == reference["optimizer_states"][0][
        "param_groups"][0]["lr"]
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]  # schedule position, base lr
    resumed_rng, reference_rng = resumed["moco_lightning"]["rng"][0], reference["moco_lightning"]["rng"][0]
    assert torch.equal(resumed_rng["torch"], reference_rng["torch"])
    assert torch.equal(resumed_rng["numpy"][1], reference_rng["numpy"][1])
    assert resumed_rng["python"] == reference_rng["python"]


@pytest.mark.timeout(600)
def test_reference_and_interrupted_runs_behave(runs):
    out, _, _ = runs
    assert out["reference"][0] == 0, out["reference"][1][-3000:]
    assert out["killed"][0] == -9  # SIGKILL: no handler, no cleanup
    assert out["terminated"][0] == 143, out["terminated"][1][-3000:]


@pytest.mark.timeout(600)
def test_resume_after_sigkill_mid_epoch_ends_exactly_as_the_uninterrupted_run(runs):
    out, finals, losses = runs
    assert out["mid_epoch"][0] == 0, out["mid_epoch"][1][-3000:]
    assert "resuming from" in out["mid_epoch"][1] and "step00000005.ckpt (epoch 1, step 5)" in out["mid_epoch"][1]
    assert losses["mid_epoch"] == {5: losses["reference"][5]}  # the epoch's remaining batch, then the end
    _assert_same_end(finals["mid_epoch"], finals["reference"])


@pytest.mark.timeout(600)
def test_auto_resume_skips_a_corrupt_newest_checkpoint_and_resumes_exactly_from_the_epoch_boundary(runs):
    out, finals, _ = runs
    returncode, output = out["corrupt"]
    assert returncode == 0, output[-3000:]
    assert "skipping" in output and "step00000005.ckpt" in output and "truncated or corrupt" in output
    assert "last.ckpt (epoch 0, step 3)" in output  # the one before it: written at the end of epoch 0
    _assert_same_end(finals["corrupt"], finals["reference"])


@pytest.mark.timeout(600)
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(runs):
    out, _, _ = runs
    returncode, output = out["terminated"]
    assert "Traceback" not in output
    assert "stopped by SIGTERM at step 5: saved" in output and "ckpt_path=auto hydra.run.dir=" in output
    assert out["terminated_step"] == 5 and "last.ckpt" in out["terminated_checkpoints"]


@pytest.mark.timeout(600)
def test_auto_resume_after_sigterm_ends_exactly_as_the_uninterrupted_run(runs):
    out, finals, _ = runs
    returncode, output = out["terminated_resumed"]
    assert returncode == 0, output[-3000:]
    assert "last.ckpt (epoch 1, step 5)" in output
    _assert_same_end(finals["terminated"], finals["reference"])
