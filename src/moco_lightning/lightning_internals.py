"""Every use of Lightning's internals, in one place, with the upstream change whose release lets it go.

Exact resume, preemption saves and the lr schedules need a few things Lightning does not expose. They are reached
only through the functions of this module, which raise ``LightningInternalsError`` (one line: what moved,
what it breaks, the tested Lightning range) rather than let another Lightning turn a resume inexact without a
word. ``tests/test_lightning_internals.py`` checks each entry of :data:`PRIVATE_USES` against the installed
Lightning; ``nox -s lightning -- <version>`` runs those and the resume and preemption tests against another one.

What is used, by what, and what lets it go:

* ``Trainer._signal_connector.received_sigterm`` (set, to stop after the step the SIGTERM way, on every process
  at once once they agreed on a signal) and ``._original_handlers`` (to hand the signals back):
  ``PreemptionCheckpoint``.
  Goes with a public "stop after this step" in Lightning (none filed; ``Trainer.received_sigterm`` is read-only).
* ``Trainer._accelerator_connector.cluster_environment``, ``Trainer._checkpoint_connector.hpc_save_path`` and
  ``Trainer._signal_connector._slurm_sigusr_handler_fn``: ``PreemptionCheckpoint`` under SLURM auto-requeue,
  Lightning's own save and requeue at a step boundary. Goes with a public hook for it (none filed).
* ``FitLoop._combined_loader_states_to_load``, ``._combined_loader``, ``._data_fetcher``,
  ``._load_combined_loader_states()``, ``.restarted_mid_epoch``, ``.restarting`` and
  ``.epoch_loop.batch_progress``: ``ResumeState``, the loader position that
  Lightning leaves unloaded when ``configure_optimizers`` reads ``estimated_stepping_batches`` (Lightning issue
  #20550). Goes with the release of Lightning PR #21765.
* ``FitLoop.setup_data()`` (public name, not documented): ``optim.steps_per_epoch`` builds the train loader
  inside ``configure_optimizers``, as ``Trainer.estimated_stepping_batches`` does. Goes with a documented way to
  size the loader there (none filed).
* Not an internal but a workaround: ``AtomicCheckpointIO`` (``checkpointing/atomic_io.py``) replaces the
  save of ``TorchCheckpointIO``, which writes through the system temporary folder (Lightning issue #21253). Goes
  with the release of Lightning PR #21744.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

__all__ = [
    "PRIVATE_USES",
    "TESTED_LIGHTNING",
    "LightningInternalsError",
    "internal",
    "request_stop_after_step",
    "require_internals",
    "restore_loader_position",
    "setup_train_data",
    "signal_handler_snapshot",
    "slurm_requeue",
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
}


class LightningInternalsError(RuntimeError):
    """The installed Lightning lacks an internal this package relies on (see :data:`PRIVATE_USES`)."""


def internal(trainer: Any, path: str) -> Any:
    """The Lightning internal at ``path`` (a key of :data:`PRIVATE_USES`) of ``trainer``.

    Raises:
        LightningInternalsError: the installed Lightning does not have it.

    """
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
    """Set Lightning's SIGTERM flag: the loop finishes the step and raises ``SIGTERMException``.

    Lightning broadcasts rank 0's flag only: set it on every process at the same step (``PreemptionCheckpoint``).
    """
    internal(trainer, "_signal_connector.received_sigterm")
    trainer._signal_connector.received_sigterm = True


def signal_handler_snapshot(trainer: L.Trainer) -> dict[int, Any]:
    """The handlers Lightning puts back at teardown (the dict itself, to be edited in place)."""
    return internal(trainer, "_signal_connector._original_handlers")


def slurm_requeue(trainer: L.Trainer, signum: int) -> Path | None:
    """Under SLURM auto-requeue and its signal, Lightning's requeue: ``hpc_ckpt_<n>.ckpt``, ``scontrol requeue``.

    Returns the checkpoint's path, or ``None`` (nothing done) outside SLURM auto-requeue or for another signal.
    """
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
