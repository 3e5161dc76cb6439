"""Real `python train.py` runs in a subprocess on tiny digits: a run, a resume, a 2-job multirun, a bad value."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import TINY, run_train

pytestmark = pytest.mark.slow


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run")
    result = run_train([*TINY, f"hydra.run.dir={out}"], cwd=out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


@pytest.mark.timeout(300)
def test_train_runs_and_reports_knn(first_run):
    out, stdout = first_run
    assert "raw pixels" in stdout and "encoder at init" in stdout and "trained encoder" in stdout
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "checkpoints").glob("epoch000-knn*.ckpt")), "no best-by-kNN checkpoint"
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/knn_top1" in metrics
    assert "dictionary/key_drift" in metrics and "val/uniformity" in metrics
    embedding_map = out / "embedding_maps" / "final.png"
    assert f"embedding map: {embedding_map}" in stdout and embedding_map.is_file()
    saved = yaml.safe_load((out / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["queue_size"] == 48


@pytest.mark.timeout(300)
def test_the_encoder_at_init_is_measured_once_by_the_knn_monitor(first_run):
    out, stdout = first_run
    log = (out / "train.log").read_text()
    assert "the encoder at init: the kNN monitor's first pass" in log  # the report did not measure it again
    header, *rows = [line for line in (out / "csv" / "metrics.csv").read_text().splitlines() if line]
    column = header.split(",").index("val/knn_top1_init")
    logged = [float(row.split(",")[column]) for row in rows if row.split(",")[column]]
    row = next(line for line in stdout.splitlines() if line.lstrip().startswith("encoder at init"))
    assert len(logged) == 1 and f"{100 * logged[0]:6.1f} %" in row, (logged, row)


@pytest.mark.timeout(300)
def test_train_log_holds_the_knn_table_and_the_summary_the_console_shows(first_run):
    out, stdout = first_run
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("kNN top-1 on"))
    table = lines[start:start + 4]
    assert table[-1].lstrip().startswith("trained encoder"), table
    summary = [line for line in lines if line.startswith(("embedding map: ", "checkpoints: "))]
    assert len(summary) == 2
    log = (out / "train.log").read_text()
    assert "\n".join(table) in log and all(line in log for line in summary)
    assert stdout.count(table[0]) == 1  # printed once: the log file's copy does not reach the console


@pytest.mark.timeout(300)
def test_a_run_that_ends_with_an_error_leaves_it_in_the_run_folder_until_the_next_start(tmp_path):
    # moco-sweep-report tells a failed job (error.txt) from one still running (none) by this file
    args = [*TINY, "knn_report=false", "~callbacks.knn", "callbacks.embedding_map=null", f"hydra.run.dir={tmp_path}"]
    result = run_train([*args, "model.lr=1e30"], cwd=tmp_path, timeout=240)  # the loss becomes NaN at step 2
    assert result.returncode == 1 and "error: the training loss became nan" in result.stderr
    assert (tmp_path / "error.txt").read_text() == result.stderr.split("error: ")[-1]
    result = run_train(args, cwd=tmp_path, timeout=240)  # the same folder, started again
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "error.txt").exists()


@pytest.mark.timeout(300)
def test_resume_from_last_checkpoint_restores_step_and_queue(first_run, tmp_path):
    out, _ = first_run
    last = out / "checkpoints" / "last.ckpt"
    before = _load(last)
    assert before["global_step"] == 2 and int(before["state_dict"]["key_queue.ptr"]) == 32  # 2 x 16 keys in 48

    result = run_train([*TINY, "trainer.max_epochs=2", f"ckpt_path={last}", f"hydra.run.dir={tmp_path}"],
                       cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    after = _load(tmp_path / "checkpoints" / "last.ckpt")
    assert after["global_step"] == 4 and after["epoch"] == 1
    assert "trained encoder" in result.stdout  # a resumed run that finishes prints its kNN table too
    assert int(after["state_dict"]["key_queue.ptr"]) == (32 + 2 * 16) % 48  # continued from the saved pointer


@pytest.mark.timeout(300)
def test_multirun_runs_each_job_in_its_own_folder(tmp_path):
    args = ["-m", *TINY, "model.momentum=0.99,0.999", "knn_report=false", "~callbacks.knn",
            f"hydra.sweep.dir={tmp_path}"]
    result = run_train(args, cwd=tmp_path, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    momenta = []
    for job in ("0", "1"):
        assert (tmp_path / job / "checkpoints" / "last.ckpt").is_file()
        momenta.append(yaml.safe_load((tmp_path / job / ".hydra" / "config.yaml").read_text())["model"]["momentum"])
    assert sorted(momenta) == [0.99, 0.999]

    from moco_lightning.cli.sweep_report import read_sweep  # the report reads the real layout of a Hydra sweep

    sweep = read_sweep(tmp_path, metric="train/loss")  # the kNN monitor is off in this sweep
    assert sweep.swept == ["model.momentum"] and not sweep.problems()
    assert sorted(float(job.overrides["model.momentum"]) for job in sweep.jobs) == [0.99, 0.999]


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("args", "key"), [
    (["model.temperature=0"], "model.temperature"),
    (["backbone=resnet101"], "backbone=resnet101"),
])
def test_wrong_value_is_a_one_line_error_with_status_2(tmp_path, args, key):
    result = run_train([*args, f"hydra.run.dir={tmp_path}"], cwd=tmp_path, timeout=110)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and key in errors[0]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.timeout(120)
def test_console_script_composes_the_flagship_from_any_directory(tmp_path):
    script = Path(sys.executable).with_name("moco-train")
    if not script.is_file():
        pytest.skip("the moco-train console script is not installed (pip install -e .)")
    args = [str(script), "--cfg", "job", "--resolve", "backbone=resnet50", "trainer.devices=8"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = yaml.safe_load(result.stdout)
    assert cfg["trainer"]["devices"] == 8 and cfg["trainer"]["strategy"] == "auto"
    assert cfg["model"]["backbone"] == "resnet50"


@pytest.mark.timeout(300)
def test_two_process_ddp_run_on_cpu(tmp_path):
    tiny = [arg for arg in TINY if not arg.startswith("model.queue_size")]
    args = [*tiny, "trainer.devices=2", "model.queue_size=96", "knn_report=false", f"hydra.run.dir={tmp_path}"]
    result = run_train(args, cwd=tmp_path, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = _load(tmp_path / "checkpoints" / "last.ckpt")
    # each step enqueues the keys of both processes (2 x 16): after 2 steps the pointer is at 64, not 32
    assert checkpoint["global_step"] == 2 and int(checkpoint["state_dict"]["key_queue.ptr"]) == 64
