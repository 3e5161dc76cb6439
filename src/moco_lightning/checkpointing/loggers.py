"""Logs that survive a kill and a resume: one CSV file with every logged step once, the same TensorBoard and wandb run.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when a new run opens the folder; :class:`ResumableCSVLogger`
appends instead and drops the rows of steps the checkpoint does not contain (the killed run's last rows, logged
again after the resume): at :func:`continue_loggers` (the training CLI), or else at the first rows written.
:func:`continue_loggers` also gives TensorBoard the checkpoint's step as ``purge_step`` and wandb the run id that
:class:`~moco_lightning.checkpointing.ResumeState` saved (``resume="allow"``). The Lightning internals this needs
are reached through :mod:`moco_lightning.lightning_internals`.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

from moco_lightning.checkpointing.run_state import CHECKPOINT_KEY
from moco_lightning.lightning_internals import (
    KeepingExperimentWriter,
    csv_logger_writer,
    logger_started,
    tensorboard_purge_step,
    wandb_resume_run,
)

__all__ = ["ResumableCSVLogger", "continue_loggers", "logging_step"]

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


class _ResumableWriter(KeepingExperimentWriter):
    """Lightning's CSV writer that keeps an existing ``metrics.csv`` and drops its rows of steps logged again."""

    def __init__(self, log_dir: str) -> None:
        self._cut_at: float | None = None
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            header, _ = _read_rows(self.metrics_file_path)
            self.metrics_keys = sorted(set(header))

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
        super().save()


class ResumableCSVLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` survives a resume (see the module doc).

    Same arguments as Lightning's logger. Use ``version=""`` (the configs do) so that every launch of a run writes
    the same file.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableWriter:  # type: ignore[override]
        """The writer (on the main process; a no-op elsewhere): keeps an existing ``metrics.csv``."""
        return csv_logger_writer(self, _ResumableWriter)  # type: ignore[return-value]

    @rank_zero_only
    def continue_from(self, step: int) -> None:
        """Drop the rows of steps ``>= step`` now (the training CLI calls it with the checkpoint's logging step)."""
        self.experiment.cut(step)


def continue_loggers(loggers: Iterable[Logger], checkpoint: Mapping[str, Any]) -> None:
    """Make the loggers of a run resumed from ``checkpoint`` continue the run's logs instead of starting anew.

    Call it before anything is logged (the loggers' files and runs are opened at their first use).
    """
    step = logging_step(checkpoint)
    saved = checkpoint.get(CHECKPOINT_KEY) or {}
    for logger in loggers:
        if isinstance(logger, ResumableCSVLogger):
            logger.continue_from(step)
        elif isinstance(logger, TensorBoardLogger) and not logger_started(logger):
            tensorboard_purge_step(logger, step)
        elif isinstance(logger, WandbLogger) and not logger_started(logger):
            run_id = saved.get("wandb_id")
            if run_id and wandb_resume_run(logger, str(run_id)):
                log.info("wandb: resuming run %s (saved in the checkpoint)", run_id)
