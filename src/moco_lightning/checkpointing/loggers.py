"""Logs that survive a kill and a resume: one CSV file with every logged step once, the same TensorBoard and wandb run.

Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` deletes ``metrics.csv`` when a new run opens the same
folder, so a resumed run (``ckpt_path=auto``, the same ``hydra.run.dir``) would keep only the rows written after the
resume. :class:`ResumableCSVLogger` keeps the file and appends to it; the rows of steps the checkpoint does not
contain (logged by the killed run after its last checkpoint, and logged again by the resumed one) are dropped, so
each logged step is in the file once whatever the number of kills and resumes (the config writes every row as it
is logged, ``flush_logs_every_n_steps: 1``, and every checkpoint flushes the loggers, so a kill loses no row):

* the training CLI calls :func:`continue_loggers` with the checkpoint it resumes from: rows from the checkpoint's
  step on are dropped at once (the file is rewritten atomically);
* otherwise (``trainer.fit(ckpt_path=...)`` from Python) the first rows written drop the existing rows from their
  own step on.

:func:`continue_loggers` also gives a TensorBoard logger the checkpoint's step as ``purge_step`` (TensorBoard then
hides the killed run's events from that step on, and shows one run) and a wandb logger the run id the checkpoint
saved (``resume="allow"``: the same run continues). :func:`logger_state` is what
:class:`~moco_lightning.checkpointing.ResumeState` saves for that.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["ResumableCSVLogger", "continue_loggers", "logging_step", "logger_state"]

log = logging.getLogger(__name__)


def logging_step(checkpoint: Mapping[str, Any]) -> int:
    """The first step the loggers of a run resumed from ``checkpoint`` write: its ``global_step``.

    Lightning logs the metrics of a step after the step's checkpoint is taken, under the count of the steps before
    it; a run resumed from that checkpoint goes on with the next step. So the rows of steps ``< global_step`` are
    the checkpoint's, whether it was taken after a step or at an epoch's end.
    """
    return int(checkpoint.get("global_step", 0))


def _read_rows(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Header and complete rows of a metrics file; a row cut short by a kill (missing fields) is left out."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = [row for row in reader if None not in row.values() and None not in row]
        return list(reader.fieldnames or []), rows


def _step_of(row: Mapping[str, Any]) -> float:
    """The row's step (a string read from the file, an int of a new row; step 0 too); NaN where it has none."""
    step = row.get("step")
    try:
        return float("nan") if step is None or step == "" else float(step)
    except ValueError:
        return float("nan")


class _ResumableWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps an existing ``metrics.csv`` and drops its rows of steps logged again."""

    def __init__(self, log_dir: str) -> None:
        self._cut_at: float | None = None
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            header, _ = _read_rows(self.metrics_file_path)
            self.metrics_keys = sorted(set(header))

    def _check_log_dir_exists(self) -> None:
        """Keep the files of an earlier launch of the run (Lightning's writer deletes them)."""

    def cut(self, step: float) -> None:
        """Drop the rows of the existing file from ``step`` on (atomically: a kill now leaves one of both files)."""
        self._cut_at = step
        if not os.path.isfile(self.metrics_file_path):
            return
        header, rows = _read_rows(self.metrics_file_path)
        kept = [row for row in rows if _step_of(row) < step]
        if len(kept) == len(rows) and header:
            return
        descriptor, temporary = tempfile.mkstemp(dir=self.log_dir, prefix=".metrics.", suffix=".csv")
        try:
            with os.fdopen(descriptor, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            os.replace(temporary, self.metrics_file_path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        if len(rows) > len(kept):
            log.info("%s: dropped %d rows of steps >= %d (logged after the checkpoint; they are logged again)",
                     self.metrics_file_path, len(rows) - len(kept), int(step))

    def save(self) -> None:
        """Append the new rows; the first save of a run also drops the file's rows from the new rows' first step."""
        if self.metrics and self._cut_at is None:
            self.cut(min(_step_of(row) for row in self.metrics))
        _FabricExperimentWriter.save(self)


class ResumableCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` survives a resume (see the module doc).

    Same arguments as Lightning's logger. Use ``version=""`` (the configs do) so that every launch of a run writes
    the same file.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableWriter:  # type: ignore[override]
        """The writer (on the main process; a no-op elsewhere): keeps an existing ``metrics.csv``."""
        if self._experiment is not None:
            return self._experiment
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment

    @rank_zero_only
    def continue_from(self, step: int) -> None:
        """Drop the rows of steps ``>= step`` now (the training CLI calls it with the checkpoint's logging step)."""
        self.experiment.cut(step)


def logger_state(loggers: Iterable[Logger]) -> dict[str, Any]:
    """What a checkpoint keeps to continue the loggers' runs: the wandb run id (``{"wandb_id": ...}`` or empty)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.version:
            return {"wandb_id": str(logger.version)}
    return {}


def continue_loggers(loggers: Iterable[Logger], checkpoint: Mapping[str, Any]) -> None:
    """Make the loggers of a run resumed from ``checkpoint`` continue the run's logs instead of starting anew.

    Call it before anything is logged (the loggers' files and runs are opened at their first use).
    """
    from moco_lightning.checkpointing.run_state import CHECKPOINT_KEY

    step = logging_step(checkpoint)
    saved = checkpoint.get(CHECKPOINT_KEY) or {}
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.continue_from(step)
        elif isinstance(logger, TensorBoardLogger) and getattr(logger, "_experiment", None) is None:
            logger._kwargs.setdefault("purge_step", step)
        elif isinstance(logger, WandbLogger) and getattr(logger, "_experiment", None) is None:
            run_id = saved.get("wandb_id")
            if run_id and not logger._wandb_init.get("id"):
                logger._wandb_init.update(id=run_id, resume="allow")
                logger._id = run_id
                log.info("wandb: resuming run %s (saved in the checkpoint)", run_id)
