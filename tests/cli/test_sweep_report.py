"""`moco-sweep-report <multirun folder>`: table sorted by the metric, heatmap, CSV, and the jobs that went wrong.

The sweep folder is written by hand in the layout Hydra's basic sweeper produces (checked against a real
`train.py -m` run in test_train_run.py), so these tests run no training.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from moco_lightning.cli.sweep_report import main, read_sweep

GRID = {"model.momentum": ["0.99", "0.999"], "model.queue_size": ["64", "256"]}


def _job(root: Path, number: int, momentum: str, queue: str, knn: list[float] | None, max_epochs: int = 3,
         error: str | None = None) -> None:
    job = root / str(number)
    (job / ".hydra").mkdir(parents=True)
    if error is not None:
        (job / "error.txt").write_text(error + "\n")  # what train.py leaves when a run ends with an error
    overrides = ["trainer.max_epochs=3", f"model.momentum={momentum}", f"model.queue_size={queue}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"optimized_metric": "val/knn_top1", "trainer": {"max_epochs": max_epochs}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if knn is None:
        return
    (job / "csv").mkdir()
    rows = ["epoch,step,train/loss,val/knn_top1"]
    for epoch, value in enumerate(knn):
        rows += [f"{epoch},{2 * epoch},5.0,", f"{epoch},{2 * epoch + 1},,{value}"]
    (job / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")


@pytest.fixture
def sweep(tmp_path) -> Path:
    task = ["trainer.max_epochs=3", *(f"{k}={','.join(v)}" for k, v in GRID.items())]
    multirun = {"hydra": {"sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
                                      "params": None},
                          "overrides": {"task": task}}}
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    _job(tmp_path, 0, "0.99", "64", [0.70, 0.80, 0.82])
    _job(tmp_path, 1, "0.99", "256", [0.70, 0.85, 0.90])
    _job(tmp_path, 2, "0.999", "64", [0.75])  # stopped after its first epoch
    _job(tmp_path, 3, "0.999", "256", None, error="the disk is full")  # failed before its first log
    return tmp_path


def test_jobs_are_ranked_by_the_final_metric_with_their_status(sweep):
    report = read_sweep(sweep)
    assert report.metric == "val/knn_top1" and report.swept == ["model.momentum", "model.queue_size"]
    ranked = [(j.name, j.metric, j.status) for j in report.ranked()]
    assert ranked == [("1", 0.90, "done"), ("0", 0.82, "done"), ("2", 0.75, "unfinished"), ("3", None, "failed")]


def test_problems_name_failed_unfinished_and_missing_jobs(sweep):
    _job_dir = sweep / "1"
    for path in sorted(_job_dir.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    _job_dir.rmdir()  # the sweep stopped before this grid point
    problems = read_sweep(sweep).problems()
    assert any(line.startswith("job 2 (model.momentum=0.999 model.queue_size=64): unfinished") and "epoch 1 of 3"
               in line for line in problems)
    assert any(line.startswith("job 3 (") and "failed, error.txt: the disk is full" in line for line in problems)
    assert "not started (model.momentum=0.99 model.queue_size=256): no job folder" in problems


@pytest.mark.parametrize("logged", [False, True], ids=["no metrics.csv", "no kNN yet"])
def test_a_job_without_a_result_or_an_error_is_unfinished_not_failed(sweep, logged):
    job = sweep / "3"
    (job / "error.txt").unlink()  # still running: no error, and nothing or only the loss logged so far
    if logged:
        (job / "csv").mkdir()
        (job / "csv" / "metrics.csv").write_text("epoch,step,train/loss,val/knn_top1\n0,0,5.0,\n")
    status = {j.name: (j.status, j.reason) for j in read_sweep(sweep).jobs}["3"]
    assert status[0] == "unfinished" and "still running" in status[1]
    (job / "error.txt").write_text("the training loss became nan at step 3\n")
    status = {j.name: (j.status, j.reason) for j in read_sweep(sweep).jobs}["3"]
    assert status == ("failed", "error.txt: the training loss became nan at step 3")


def test_report_prints_the_table_and_saves_heatmap_and_csv(sweep, capsys):
    main([str(sweep)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("job "))
    assert [line.split()[0] for line in lines[header + 1 : header + 5]] == ["1", "0", "2", "3"]
    assert "90.0 %" in lines[header + 1] and "2 job(s) failed or did not finish" in out
    image = imread(sweep / "sweep_heatmap.png")
    assert image.shape[0] > 150 and image.shape[1] > 200 and image[..., :3].std() > 0.05
    with open(sweep / "sweep_report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["status"]) for r in rows] == [("1", "done"), ("0", "done"), ("2", "unfinished"),
                                                        ("3", "failed")]


def test_heatmap_keys_can_be_chosen_and_must_be_swept(sweep, capsys, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("report")
    main([str(sweep), "--x", "model.queue_size", "--y", "model.momentum", "--out", str(out_dir)])
    assert (out_dir / "sweep_heatmap.png").is_file() and (out_dir / "sweep_report.csv").is_file()
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--x", "model.lr"])
    assert exit_info.value.code == 2
    assert "--x model.lr: not a swept key" in capsys.readouterr().err


def test_curves_draw_each_job_that_logged_the_metric(sweep, capsys, monkeypatch):
    from moco_lightning import plots

    drawn = {}
    real = plots.sweep_curves_figure

    def spy(runs, metrics, title=""):
        drawn.update(runs=runs, metrics=metrics)
        return real(runs, metrics, title)

    monkeypatch.setattr(plots, "sweep_curves_figure", spy)
    main([str(sweep), "--curves", "val/knn_top1,train/loss"])
    assert f"curves: {sweep / 'sweep_curves.png'}" in capsys.readouterr().out
    assert drawn["metrics"] == ["val/knn_top1", "train/loss"]
    # job 3 never logged: three lines, named by their swept values, each with its own values
    assert sorted(drawn["runs"]) == ["model.momentum=0.99 model.queue_size=256",
                                     "model.momentum=0.99 model.queue_size=64",
                                     "model.momentum=0.999 model.queue_size=64"]
    assert drawn["runs"]["model.momentum=0.99 model.queue_size=256"]["val/knn_top1"][1] == [0.70, 0.85, 0.90]
    image = imread(sweep / "sweep_curves.png")
    assert image.shape[1] > 2 * image.shape[0] and image[..., :3].std() > 0.05  # two panels side by side


def test_curves_of_a_metric_nobody_logged_is_one_line(sweep, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(sweep), "--curves", "val/nothing"])
    assert exit_info.value.code == 2 and "no metric to plot" in capsys.readouterr().err


def test_a_metric_that_is_not_an_accuracy_is_shown_as_logged(sweep, capsys):
    # train/loss is 5.0 in every job: a loss (or a key drift) is not a fraction, so no percent sign and no x100
    main([str(sweep), "--metric", "train/loss"])
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("job "))
    row = lines[header + 1]
    assert " 5 " in f"{row} " and "%" not in row and "500" not in row
