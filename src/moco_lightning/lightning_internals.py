"""Every use of Lightning's internals, in one place, with the upstream change whose release lets it go.

Exact resume, preemption saves and the lr schedules need a few things Lightning does not expose. They are reached
only through the functions of this module, which raise ``LightningInternalsError`` (one line: what moved,
what it breaks, the tested Lightning range) rather than let another Lightning turn a resume inexact without a
word. ``tests/test_lightning_internals.py`` checks each entry of :data:`PRIVATE_USES` against the installed
Lightning; ``nox -s lightning -- <version>`` runs those and the resume and preemption tests against another one.

What is used, by what, and what lets it go:

* ``Trainer._signal_connector.received_sigterm`` (set, to stop after the step the SIGTERM way, which the DDP
  processes agree on) and ``._original_handlers`` (to hand the signals back): ``PreemptionCheckpoint``.
  Goes with a public "stop after this step" in Lightning (none filed; ``Trainer.received_sigterm`` is read-only).
* ``Trainer._accelerator_connector.cluster_environment``, ``Trainer._checkpoint_connector.hpc_save_path`` and
  ``Trainer._signal_connector._slurm_sigusr_handler_fn``: ``PreemptionCheckpoint`` under SLURM auto-requeue,
  Lightning's own save and requeue at a step boundary. Goes with a public hook for it (none filed).
* ``FitLoop._combined_loader_states_to_load``, ``._combined_loader``, ``._data_fetcher``,
  ``._load_combined_loader_states()`` and ``.restarted_mid_epoch``: ``ResumeState``, the loader position that
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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

__all__ = [
    "PRIVATE_USES",
    "TESTED_LIGHTNING",
    "LightningInternalsError",
    "PrivateUse",
    "cluster_environment",
    "internal",
    "load_pending_loader_states",
    "pending_loader_states",
    "request_stop_after_step",
    "require_internals",
    "restarted_mid_epoch",
    "setup_train_data",
    "signal_handler_snapshot",
    "slurm_save_and_requeue",
]

#: The Lightning versions the resume and preemption tests pass with: the range pyproject.toml requires.
TESTED_LIGHTNING = ">=2.6,<2.7"


@dataclass(frozen=True)
class PrivateUse:
    """One Lightning internal the package relies on.

    Attributes:
        path: where it is, from a ``Trainer`` (``"fit_loop._data_fetcher"``).
        used_by: the feature of this package that needs it.
        upstream: the Lightning issue / pull request whose release lets it go (or why there is none).

    """

    path: str
    used_by: str
    upstream: str


_PREEMPTION = "PreemptionCheckpoint (stop after the step, then save)"
_SLURM = "PreemptionCheckpoint under SLURM auto-requeue (Lightning's hpc save and requeue)"
_LOADER = "ResumeState's mid-epoch loader position (Lightning #20550)"
_NO_ISSUE = "no public API, none filed"
_FIX_20550 = "the release with PR #21765 (fixes #20550)"

#: Each Lightning internal in use, reached from a ``Trainer`` (see the table above).
PRIVATE_USES: tuple[PrivateUse, ...] = (
    PrivateUse("_signal_connector.received_sigterm", _PREEMPTION, _NO_ISSUE),
    PrivateUse("_signal_connector._original_handlers", _PREEMPTION, _NO_ISSUE),
    PrivateUse("_signal_connector._slurm_sigusr_handler_fn", _SLURM, _NO_ISSUE),
    PrivateUse("_accelerator_connector.cluster_environment", _SLURM, _NO_ISSUE),
    PrivateUse("_checkpoint_connector.hpc_save_path", _SLURM, _NO_ISSUE),
    PrivateUse("fit_loop._combined_loader_states_to_load", _LOADER, _FIX_20550),
    PrivateUse("fit_loop._combined_loader", _LOADER, _FIX_20550),
    PrivateUse("fit_loop._data_fetcher", _LOADER, _FIX_20550),
    PrivateUse("fit_loop._load_combined_loader_states", _LOADER, _FIX_20550),
    PrivateUse("fit_loop.restarted_mid_epoch", _LOADER, _FIX_20550),
    PrivateUse("fit_loop.setup_data", "the lr schedule's epoch length (optim.steps_per_epoch)", _NO_ISSUE),
)


class LightningInternalsError(RuntimeError):
    """The installed Lightning lacks an internal this package relies on (see :data:`PRIVATE_USES`)."""


def internal(trainer: Any, path: str) -> Any:
    """The Lightning internal at ``path`` (an entry of :data:`PRIVATE_USES`) of ``trainer``.

    Raises:
        LightningInternalsError: the installed Lightning does not have it.

    """
    use = next(u for u in PRIVATE_USES if u.path == path)
    value = trainer
    for name in path.split("."):
        try:
            value = getattr(value, name)
        except AttributeError:
            raise LightningInternalsError(
                f"lightning {L.__version__} has no Trainer.{path}, which {use.used_by} needs; install "
                f"lightning{TESTED_LIGHTNING}, the range moco-lightning is tested with "
                "(see moco_lightning/lightning_internals.py)") from None
    return value


def require_internals(trainer: Any, used_by: str) -> None:
    """Check, before any compute, that every internal of :data:`PRIVATE_USES` that ``used_by`` starts with is there.

    Raises:
        LightningInternalsError: one of them is missing.

    """
    for use in PRIVATE_USES:
        if use.used_by.startswith(used_by):
            internal(trainer, use.path)


# ------------------------------------------------------------------------------------------------ preemption
def request_stop_after_step(trainer: L.Trainer) -> None:
    """Set Lightning's SIGTERM flag: the loop finishes the step and raises ``SIGTERMException`` (on every rank)."""
    internal(trainer, "_signal_connector.received_sigterm")  # raises where Lightning moved it
    trainer._signal_connector.received_sigterm = True


def signal_handler_snapshot(trainer: L.Trainer) -> dict[int, Any]:
    """The handlers Lightning puts back at teardown (the dict itself, to be edited in place)."""
    return internal(trainer, "_signal_connector._original_handlers")


def cluster_environment(trainer: L.Trainer) -> Any:
    """The cluster environment, read where Lightning's signal connector reads it."""
    return internal(trainer, "_accelerator_connector.cluster_environment")


def slurm_save_and_requeue(trainer: L.Trainer, signum: int) -> Path:
    """Lightning's SLURM requeue handler: ``hpc_ckpt_<n>.ckpt`` in ``default_root_dir``, then ``scontrol requeue``.

    Returns the checkpoint's path.
    """
    path = Path(internal(trainer, "_checkpoint_connector.hpc_save_path")(trainer.default_root_dir))
    internal(trainer, "_signal_connector._slurm_sigusr_handler_fn")(signum, None)
    return path


# ---------------------------------------------------------------------------------------------------- resume
def pending_loader_states(trainer: L.Trainer) -> tuple[list[dict[str, Any]], Any, Any]:
    """``(loader states still to load, combined loader, data fetcher)`` of the fit loop (Lightning #20550)."""
    return (internal(trainer, "fit_loop._combined_loader_states_to_load"),
            internal(trainer, "fit_loop._combined_loader"), internal(trainer, "fit_loop._data_fetcher"))


def load_pending_loader_states(trainer: L.Trainer) -> None:
    """Load the pending loader states into the combined loader, as Lightning's restore does when it gets to it."""
    internal(trainer, "fit_loop._load_combined_loader_states")()


def restarted_mid_epoch(trainer: L.Trainer) -> bool:
    """Whether the fit loop resumed from a checkpoint taken in the middle of an epoch."""
    return bool(internal(trainer, "fit_loop.restarted_mid_epoch"))


# ---------------------------------------------------------------------------------------------------- optim
def setup_train_data(trainer: L.Trainer) -> None:
    """Build the train loader now, as ``Trainer.estimated_stepping_batches`` does when it needs its length."""
    internal(trainer, "fit_loop.setup_data")()
