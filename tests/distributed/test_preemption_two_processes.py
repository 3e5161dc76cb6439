"""A preemption signal that reaches one process of a two-process `python train.py` run (Lightning's DDP, gloo).

Lightning shares only rank 0's stop flag, so a signal on rank 1 alone used to stop rank 1 while rank 0 waited in
the next collective for ever. Each run here signals one rank only, at the start of step 5: both processes must
finish that step, stop together, write one checkpoint of step 5 and exit with the signal's status; resumed with
``ckpt_path=auto``, the run must end exactly as the uninterrupted one (CPU, one thread, seeded).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "cli"  # kill_helpers.SignalAt: a process signals itself at a chosen step

pytestmark = pytest.mark.slow

#: 2 epochs x 3 steps of 2 processes x 8 images of 8 px; last.ckpt at every epoch end and on the signal
RUN = ["trainer.accelerator=cpu", "trainer.devices=2", "data.image_size=8", "data.batch_size=8",
       "model.queue_size=48", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "trainer.log_every_n_steps=1",
       "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0", "knn_report=false",
       "~callbacks.knn", "~callbacks.model_checkpoint"]
SIGNALLED = {"usr1_rank1": ("SIGUSR1", 1), "term_rank0": ("SIGTERM", 0)}


def _start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout kills rank 1 too


def _wait(*processes: subprocess.Popen) -> list[tuple[int, str]]:
    """Wait for each run (200 s at most); on a timeout (a hang) kill every process of every run."""
    results = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=200)
            results.append((process.returncode, output))
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preemption_ddp")
    dirs = {name: root / name for name in ("reference", *SIGNALLED)}
    starts = [_start(dirs["reference"])]
    for name, (signal_name, rank) in SIGNALLED.items():
        starts.append(_start(dirs[name], "+callbacks.kill._target_=kill_helpers.SignalAt",
                             "+callbacks.kill.after_step=4", f"+callbacks.kill.signal_name={signal_name}",
                             f"+callbacks.kill.rank={rank}"))
    out = dict(zip(dirs, _wait(*starts)))
    stopped = {name: _load(dirs[name] / "checkpoints" / "last.ckpt")["global_step"] for name in SIGNALLED
               if (dirs[name] / "checkpoints" / "last.ckpt").is_file()}
    resumed = dict(zip(SIGNALLED, _wait(*(_start(dirs[name], "ckpt_path=auto") for name in SIGNALLED))))
    finals = {name: _load(path / "checkpoints" / "last.ckpt") for name, path in dirs.items()}
    yield out, stopped, resumed, finals
    shutil.rmtree(root, ignore_errors=True)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_equal(resumed, reference, where: str = "checkpoint") -> None:
    """Bit-for-bit equality of nested checkpoint contents (tensors, numbers, lists, dicts)."""
    if isinstance(reference, torch.Tensor):
        assert torch.equal(resumed, reference), where
    elif isinstance(reference, dict):
        assert resumed.keys() == reference.keys(), where
        for key, value in reference.items():
            _assert_equal(resumed[key], value, f"{where}.{key}")
    elif isinstance(reference, list | tuple):
        assert len(resumed) == len(reference), where
        for index, (a, b) in enumerate(zip(resumed, reference)):
            _assert_equal(a, b, f"{where}[{index}]")
    else:
        assert resumed == reference, where


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(SIGNALLED))
def test_a_signal_on_one_rank_stops_both_after_the_same_step_with_one_checkpoint(runs, name):
    out, stopped, _, _ = runs
    assert out["reference"][0] == 0, out["reference"][1][-3000:]
    signal_name, rank = SIGNALLED[name]
    returncode, output = out[name]
    assert returncode == 128 + getattr(signal, signal_name), output[-3000:]  # did not hang (killed: -9)
    assert output.count(f"received {signal_name}: stopping after the current step") == 1  # the signalled rank
    assert f"rank {1 - rank}: another process received {signal_name}: stopping after this step" in output
    assert output.count(f"stopped by {signal_name} at step 5: saved") == 1 and "Traceback" not in output
    assert stopped[name] == 5  # step 5, in progress when the signal came, finished and saved on both


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(SIGNALLED))
def test_the_resumed_run_ends_exactly_as_the_uninterrupted_one(runs, name):
    _, _, resumed, finals = runs
    returncode, output = resumed[name]
    assert returncode == 0, output[-3000:]
    assert "last.ckpt (epoch 1, step 5)" in output
    reference, final = finals["reference"], finals[name]
    assert final["global_step"] == reference["global_step"] == 6
    for key in ("state_dict", "optimizer_states", "lr_schedulers"):  # both encoders, queue, pointer, momentum...
        _assert_equal(final[key], reference[key], key)
    _assert_equal(final["moco_lightning"]["rng"], reference["moco_lightning"]["rng"], "rng")  # every rank's
