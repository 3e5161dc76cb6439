"""Logs across a resume: the CSV file keeps every logged step once, TensorBoard continues, wandb gets its run id."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from moco_lightning.checkpointing import CHECKPOINT_KEY, ResumableCSVLogger, continue_loggers
from moco_lightning.checkpointing.run_state import logger_state


def _rows(path: Path) -> list[tuple[int, str]]:
    with open(path, newline="") as handle:
        return [(int(row["step"]), next(k for k, v in row.items() if v and k != "step"))
                for row in csv.DictReader(handle)]


def _log(logger: ResumableCSVLogger, steps: range, name: str = "loss") -> None:
    for step in steps:
        logger.log_metrics({name: float(step)}, step=step)
    logger.save()


def test_a_resumed_csv_log_keeps_the_checkpoints_rows_and_replaces_the_later_ones(tmp_path):
    _log(ResumableCSVLogger(tmp_path, name="csv", version=""), range(0, 7))  # killed after step 6
    metrics = tmp_path / "csv" / "metrics.csv"
    with open(metrics, "a") as handle:
        handle.write("7.5")  # a row cut short by the kill
    resumed = ResumableCSVLogger(tmp_path, name="csv", version="")
    continue_loggers([resumed], {"global_step": 4})
    assert _rows(metrics) == [(s, "loss") for s in range(4)]  # dropped at once: a second kill loses nothing
    _log(resumed, range(4, 9), name="acc")  # a new column: the header is rewritten with the kept rows
    assert _rows(metrics) == [(s, "loss") for s in range(4)] + [(s, "acc") for s in range(4, 9)]


def test_without_the_cli_the_first_new_rows_replace_the_old_ones_from_their_step(tmp_path):
    _log(ResumableCSVLogger(tmp_path, name="csv", version=""), range(0, 5))
    _log(ResumableCSVLogger(tmp_path, name="csv", version=""), range(3, 6))  # trainer.fit(ckpt_path=...) at 3
    assert [step for step, _ in _rows(tmp_path / "csv" / "metrics.csv")] == [0, 1, 2, 3, 4, 5]


def test_a_run_started_again_from_step_0_replaces_the_old_rows(tmp_path):
    # a run that failed, started again from scratch in its folder (the new rows begin at step 0)
    _log(ResumableCSVLogger(tmp_path, name="csv", version=""), range(0, 5), name="loss")
    _log(ResumableCSVLogger(tmp_path, name="csv", version=""), range(0, 3), name="acc")
    assert _rows(tmp_path / "csv" / "metrics.csv") == [(s, "acc") for s in range(3)]


def test_tensorboard_continues_the_run_and_hides_the_killed_runs_later_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = TensorBoardLogger(tmp_path, name="tb", version="")
    for step in range(6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.finalize("killed")
    resumed = TensorBoardLogger(tmp_path, name="tb", version="")
    continue_loggers([resumed], {"global_step": 3})
    for step in range(3, 5):
        resumed.log_metrics({"loss": 10.0 + step}, step=step)
    resumed.finalize("success")
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 13.0),
                                                                   (4, 14.0)]


def test_wandb_resumes_the_run_id_saved_in_the_checkpoint(tmp_path):
    first = WandbLogger(project="p", save_dir=str(tmp_path), offline=True, id="run123")
    saved = logger_state([first])
    assert saved == {"wandb_id": "run123"}
    resumed = WandbLogger(project="p", save_dir=str(tmp_path), offline=True)  # id: null in the config
    continue_loggers([resumed], {"global_step": 10, CHECKPOINT_KEY: saved})
    assert resumed._wandb_init["id"] == "run123" and resumed._wandb_init["resume"] == "allow"
    assert resumed.version == "run123"


def test_relaunching_a_finished_run_keeps_its_whole_log(tmp_path):
    _log(ResumableCSVLogger(tmp_path, name="csv", version=""), range(0, 6))  # the run finished at step 6
    relaunched = ResumableCSVLogger(tmp_path, name="csv", version="")
    continue_loggers([relaunched], {"global_step": 6})  # resumes from last.ckpt: nothing left to train
    relaunched.finalize("success")
    assert [step for step, _ in _rows(tmp_path / "csv" / "metrics.csv")] == [0, 1, 2, 3, 4, 5]


def test_every_checkpoint_saves_the_wandb_run_id_and_flushes_the_loggers(tmp_path):
    from types import SimpleNamespace

    from moco_lightning.checkpointing import ResumeState

    csv_logger = ResumableCSVLogger(tmp_path, name="csv", version="")
    csv_logger.log_metrics({"loss": 1.0}, step=0)  # buffered (flush_logs_every_n_steps=100 by default)
    wandb_logger = WandbLogger(project="p", save_dir=str(tmp_path), offline=True, id="abc42")
    trainer = SimpleNamespace(loggers=[csv_logger, wandb_logger], world_size=1)
    checkpoint: dict = {}
    ResumeState().on_save_checkpoint(trainer, None, checkpoint)
    assert checkpoint[CHECKPOINT_KEY]["wandb_id"] == "abc42"
    assert _rows(tmp_path / "csv" / "metrics.csv") == [(0, "loss")]  # on disk before the checkpoint is
