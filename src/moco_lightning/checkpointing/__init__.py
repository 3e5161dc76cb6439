"""Checkpoints a long run can rely on: atomic writes, exact resume, auto-resume, preemption saves.

* :mod:`~moco_lightning.checkpointing.atomic_io`: :class:`AtomicCheckpointIO` writes a temporary file in the
  checkpoint's folder, fsyncs and renames it; a full disk is a :class:`DiskFullError`.
* :mod:`~moco_lightning.checkpointing.run_state`: :class:`ResumeState` puts the RNG states of every process, the
  config, the version and the global batch in each checkpoint, and restores the generators and the loader's
  position on resume.
* :mod:`~moco_lightning.checkpointing.preemption`: :class:`PreemptionCheckpoint` turns SIGTERM / SIGUSR1 into
  "finish the step, save, stop".
* :mod:`~moco_lightning.checkpointing.loggers`: :class:`ResumableCSVLogger` and :func:`continue_loggers`: a
  resumed run continues its CSV file (every logged step once), its TensorBoard run and its wandb run.
* :mod:`~moco_lightning.checkpointing.resume`: ``ckpt_path=auto`` (:func:`find_resume_checkpoint`) and the checks
  of a checkpoint file and of its shapes against the model.
"""

from moco_lightning.checkpointing.atomic_io import AtomicCheckpointIO, DiskFullError
from moco_lightning.checkpointing.loggers import ResumableCSVLogger, continue_loggers
from moco_lightning.checkpointing.preemption import PreemptionCheckpoint
from moco_lightning.checkpointing.resume import (
    ResumeError,
    check_checkpoint_matches,
    check_checkpoint_path,
    find_resume_checkpoint,
    read_training_checkpoint,
)
from moco_lightning.checkpointing.run_state import CHECKPOINT_KEY, ResumeState, package_version

__all__ = [
    "CHECKPOINT_KEY",
    "AtomicCheckpointIO",
    "DiskFullError",
    "PreemptionCheckpoint",
    "ResumableCSVLogger",
    "ResumeError",
    "ResumeState",
    "check_checkpoint_matches",
    "check_checkpoint_path",
    "continue_loggers",
    "find_resume_checkpoint",
    "package_version",
    "read_training_checkpoint",
]
