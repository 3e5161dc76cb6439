"""Checkpoints a long run can rely on: atomic writes, exact resume, auto-resume, preemption saves.

Modules: ``atomic_io``, ``run_state``, ``resume``, ``preemption`` and ``loggers`` (logs that continue across a
resume); each one's docstring says what it does.
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
