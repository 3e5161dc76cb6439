"""Every use of Lightning's internals, in one place, with the upstream change whose release lets it go.

Exact resume, preemption saves and the lr schedules need a few things Lightning does not expose. They are reached
only through the functions of this module, which raise ``LightningInternalsError`` (one line: what moved,
what it breaks, the tested Lightning range) rather than let another Lightning turn a resume inexact without a
word. ``tests/test_lightning_internals.py`` checks each entry of :data:`PRIVATE_USES` against the installed
Lightning; ``nox -s lightning -- <version>`` runs those and the resume and preemption tests against another one.

What is used, by what, and what lets it go: :data:`PRIVATE_USES` (reached from a ``Trainer``) and
:data:`PRIVATE_ATTRIBUTES` (on other Lightning objects), one entry per internal. Not an internal but a workaround:
``AtomicCheckpointIO`` (``checkpointing/atomic_io.py``, Lightning issue #21253, goes with PR #21744).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = [
    "PRIVATE_ATTRIBUTES", "PRIVATE_USES", "KeepingExperimentWriter", "TESTED_LIGHTNING", "LightningInternalsError",
    "attached_trainer", "batches_fetched", "csv_logger_writer", "internal", "lightning_sync_batchnorm",
    "logger_started", "request_stop_after_step", "require_internals", "restore_loader_position", "setup_train_data",
    "signal_handler_snapshot", "slurm_requeue", "tensorboard_purge_step", "wandb_resume_run",
]

#: The Lightning versions the resume and preemption tests pass with: the range pyproject.toml requires.
TESTED_LIGHTNING = ">=2.6,<2.7"

_STOP = "PreemptionCheckpoint (stop after the step, then save)"
_SLURM = "PreemptionCheckpoint under SLURM auto-requeue (Lightning's hpc save and requeue)"
_LOADER = "ResumeState's mid-epoch loader position"
_NONE, _PR_21765 = "no public API, none filed", "the release with PR #21765 (fixes #20550)"

#: Each internal in use, reached from a ``Trainer``: ``{path: (the feature that needs it, what lets it go)}``.
PRIVATE_USES: dict[str, tuple[str, str]] = {
    "_signal_connector.received_sigterm": (_STOP, _NONE),
    "_signal_connector._original_handlers": (_STOP, _NONE),
    "_signal_connector._slurm_sigusr_handler_fn": (_SLURM, _NONE),
    "_accelerator_connector.cluster_environment": (_SLURM, _NONE),
    "_checkpoint_connector.hpc_save_path": (_SLURM, _NONE),
    "fit_loop._combined_loader_states_to_load": (_LOADER, _PR_21765),
    "fit_loop._combined_loader": (_LOADER, _PR_21765),
    "fit_loop._data_fetcher": (_LOADER, _PR_21765),
    "fit_loop._load_combined_loader_states": (_LOADER, _PR_21765),
    "fit_loop.restarted_mid_epoch": (_LOADER, _PR_21765),
    "fit_loop.restarting": (_LOADER, _PR_21765),
    "fit_loop.epoch_loop.batch_progress.current.ready": (_LOADER, _PR_21765),
    "fit_loop.setup_data": ("the lr schedule's epoch length (optim.steps_per_epoch)", _NONE),
    "fit_loop.epoch_loop.batch_progress.total.ready": ("the batch augmentation's per-batch seed", _NONE),
}

_CSV, _CONTINUE = "ResumableCSVLogger (keeps metrics.csv)", "continue_loggers (a resumed run's logs go on)"

#: Each internal in use on another Lightning object than the ``Trainer``: ``{Class.attribute: (feature, goes
#: with)}``; ``tests/test_lightning_internals.py`` checks each on an instance of the class.
PRIVATE_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "ParallelStrategy._layer_sync": ("MoCo.setup's refusal of Lightning's sync_batchnorm", _NONE),
    "LightningModule._trainer": ("MoCo's check whether it runs in a Trainer", _NONE),
    "CSVLogger._experiment": (_CSV, _NONE),
    "CSVLogger._fs": (_CSV, _NONE),
    "ExperimentWriter._check_log_dir_exists": (_CSV, _NONE),
    "TensorBoardLogger._kwargs": (_CONTINUE, _NONE),
    "TensorBoardLogger._experiment": (_CONTINUE, _NONE),
    "WandbLogger._wandb_init": (_CONTINUE, _NONE),
    "WandbLogger._id": (_CONTINUE, _NONE),
    "WandbLogger._experiment": (_CONTINUE, _NONE),
}


class LightningInternalsError(RuntimeError):
    """The installed Lightning lacks an internal this package relies on (see :data:`PRIVATE_USES`)."""


def internal(trainer: Any, path: str) -> Any:
    """The internal at ``path`` (a key of :data:`PRIVATE_USES`) of ``trainer``; LightningInternalsError if absent."""
    value = trainer
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except AttributeError:
            raise LightningInternalsError(
                f"lightning {L.__version__} has no Trainer.{path}, which {PRIVATE_USES[path][0]} needs; install "
                f"lightning{TESTED_LIGHTNING}, the range moco-lightning is tested with "
                "(see moco_lightning/lightning_internals.py)") from None
    return value


def require_internals(trainer: Any, used_by: str) -> None:
    """Check, before any compute, that the internals of the features starting with ``used_by`` are all there."""
    for path, (feature, _) in PRIVATE_USES.items():
        if feature.startswith(used_by):
            internal(trainer, path)


def request_stop_after_step(trainer: L.Trainer) -> None:
    """Set Lightning's SIGTERM flag (the step finishes, then ``SIGTERMException``); only rank 0's is broadcast."""
    internal(trainer, "_signal_connector.received_sigterm")
    trainer._signal_connector.received_sigterm = True


def signal_handler_snapshot(trainer: L.Trainer) -> dict[int, Any]:
    """The handlers Lightning puts back at teardown (the dict itself, to be edited in place)."""
    return internal(trainer, "_signal_connector._original_handlers")


def slurm_requeue(trainer: L.Trainer, signum: int) -> Path | None:
    """Under SLURM auto-requeue and its signal, Lightning's hpc save and requeue: the checkpoint's path, else None."""
    environment = internal(trainer, "_accelerator_connector.cluster_environment")
    if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue
            and signum == environment.requeue_signal):
        return None
    path = Path(internal(trainer, "_checkpoint_connector.hpc_save_path")(trainer.default_root_dir))
    internal(trainer, "_signal_connector._slurm_sigusr_handler_fn")(signum, None)  # saves there, then requeues
    return path


def restore_loader_position(trainer: L.Trainer) -> None:
    """Load the loader states Lightning kept pending (issue #20550) and re-create the fetcher's iterator.

    Only for a checkpoint taken mid-epoch with batches left: after a checkpoint at an epoch's end the next epoch
    starts from its own first batch (its order is drawn from the seed and the epoch), whatever the saved position.
    A no-op where Lightning already loaded them.
    """
    require_internals(trainer, "ResumeState")  # on every run: a moved internal shows before the first resume
    pending = internal(trainer, "fit_loop._combined_loader_states_to_load")
    fetcher, loader = internal(trainer, "fit_loop._data_fetcher"), internal(trainer, "fit_loop._combined_loader")
    if not pending or not internal(trainer, "fit_loop.restarting") or loader is None or fetcher is None:
        return
    drawn = internal(trainer, "fit_loop.epoch_loop.batch_progress.current.ready")
    if not (internal(trainer, "fit_loop.restarted_mid_epoch") and 0 < drawn < trainer.num_training_batches):
        return
    internal(trainer, "fit_loop._load_combined_loader_states")()
    iter(fetcher)  # the iterator made before the restore started at the epoch's first batch


def setup_train_data(trainer: L.Trainer) -> None:
    """Build the train loader now, as ``Trainer.estimated_stepping_batches`` does when it needs its length."""
    internal(trainer, "fit_loop.setup_data")()


def batches_fetched(trainer: L.Trainer) -> int:
    """The batches the fit loop has fetched over the whole run (restored from the checkpoint on resume)."""
    return int(internal(trainer, "fit_loop.epoch_loop.batch_progress.total.ready"))


def lightning_sync_batchnorm(trainer: L.Trainer) -> bool:
    """Whether Lightning converts the BatchNorm layers (``sync_batchnorm=True``: the strategy's ``_layer_sync``)."""
    return getattr(trainer.strategy, "_layer_sync", None) is not None


def attached_trainer(module: Any) -> L.Trainer | None:
    """The ``Trainer`` running ``module``, or ``None`` outside one (where ``module.trainer`` raises)."""
    return getattr(module, "_trainer", None)


class KeepingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer without the deletion of an existing ``metrics.csv`` when it opens the folder."""

    def _check_log_dir_exists(self) -> None:
        """Keep the files of an earlier launch of the run (Lightning's writer deletes ``metrics.csv``)."""


def csv_logger_writer(logger: CSVLogger, writer_class: type[ExperimentWriter]) -> ExperimentWriter:
    """``logger.experiment`` as ``CSVLogger`` builds it (its class hard-wired there), with a ``writer_class`` writer."""
    if logger._experiment is None:
        logger._fs.makedirs(logger.root_dir, exist_ok=True)
        logger._experiment = writer_class(log_dir=logger.log_dir)
    return logger._experiment


def logger_started(logger: Logger) -> bool:
    """Whether a TensorBoard or wandb logger has opened its writer or run (its arguments are then fixed)."""
    return getattr(logger, "_experiment", None) is not None


def tensorboard_purge_step(logger: TensorBoardLogger, step: int) -> None:
    """Give the ``SummaryWriter`` a logger opens ``purge_step=step`` (unless set): TensorBoard hides later events."""
    logger._kwargs.setdefault("purge_step", step)


def wandb_resume_run(logger: WandbLogger, run_id: str) -> bool:
    """Make a logger that has not started continue wandb run ``run_id``; ``False`` if it has a run id of its own."""
    if logger._wandb_init.get("id"):
        return False
    logger._wandb_init.update(id=run_id, resume="allow")
    logger._id = run_id
    return True
