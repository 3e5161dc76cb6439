"""Stop a run whose loss turned NaN or infinite, and never let a checkpoint with non-finite weights be written.

:class:`NonFiniteLossGuard` keeps its record on the device (the first step whose loss was not finite, the last
finite loss and its step: no transfer per step) and the host reads it only where it waits anyway: at Lightning's
logging steps, at epoch ends, and before every checkpoint is written (any writer), where every floating-point tensor
of the ``state_dict`` is checked too. A non-finite loss therefore stops the run at most ``log_every_n_steps`` steps
later with a :class:`NonFiniteLossError` naming the first bad step; any later save is refused, so the newest
checkpoint on disk is the last good one. Under DDP the first bad step is all-reduced at each check.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard"]


#: "no non-finite loss yet" in the record reduced over processes (a step number no run reaches).
_NONE = 2**62


class NonFiniteLossError(RuntimeError):
    """The training loss (or a weight about to be checkpointed) became NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Record non-finite losses on the device; raise :class:`NonFiniteLossError` where the host syncs anyway.

    Args:
        check_every_n_steps: read the record every this many optimizer steps; ``None`` = at the trainer's
            logging steps (``log_every_n_steps``), where Lightning copies the logged values to the host anyway.

    """

    def __init__(self, check_every_n_steps: int | None = None) -> None:
        if check_every_n_steps is not None and check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be a positive integer or null, got {check_every_n_steps}")
        self.check_every_n_steps = check_every_n_steps
        self._first_bad: torch.Tensor | None = None  # () int64, -1 while every loss was finite
        self._bad_value: torch.Tensor | None = None  # the first non-finite loss (nan, inf or -inf)
        self._last_good: torch.Tensor | None = None  # (2,) float64: last finite loss and its step
        self._last_logged: tuple[int, dict[str, float]] | None = None
        self._failed: str | None = None

    # ------------------------------------------------------------------ record, on the device
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Fold this step's loss into the record (no host sync), then check at the host-sync steps."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._record(loss.detach(), trainer.global_step)
        every = self.check_every_n_steps or max(int(trainer.log_every_n_steps or 1), 1)
        if trainer.global_step % every == 0:
            self.check(trainer)

    def _record(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.reshape(()).to(torch.float64)
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._bad_value = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._last_good = torch.full((2,), -1.0, dtype=torch.float64, device=loss.device)
        assert self._bad_value is not None and self._last_good is not None
        finite = torch.isfinite(loss)
        first = (self._first_bad < 0) & ~finite
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, step), self._first_bad)
        self._bad_value = torch.where(first, loss, self._bad_value)
        here = torch.stack([loss, torch.full_like(loss, step)])
        self._last_good = torch.where(finite & (self._first_bad < 0), here, self._last_good)

    # ------------------------------------------------------------------ check, on the host
    def check(self, trainer: L.Trainer) -> None:
        """Raise :class:`NonFiniteLossError` if a non-finite loss was recorded; else note the values logged."""
        if self._failed is not None:
            raise NonFiniteLossError(self._failed)
        if self._first_bad is None:
            return
        earliest = torch.where(self._first_bad < 0, torch.full_like(self._first_bad, _NONE), self._first_bad)
        if trainer.world_size > 1:  # every process stops at the same check, not only the one that saw the NaN
            earliest = trainer.strategy.reduce(earliest, reduce_op=torch.distributed.ReduceOp.MIN)
        step = int(earliest)  # the host sync
        if step == _NONE:
            logged = {name: float(value) for name, value in trainer.logged_metrics.items()
                      if isinstance(value, torch.Tensor | float | int) and math.isfinite(float(value))}
            if logged:
                self._last_logged = (trainer.global_step, logged)
            return
        assert self._bad_value is not None and self._last_good is not None
        here = int(self._first_bad) == step
        value = f"{float(self._bad_value)}" if here else "non-finite (on another process)"
        good_loss, good_step = (float(v) for v in self._last_good.tolist())
        self._failed = self._message(trainer, step, value, good_loss, int(good_step))
        raise NonFiniteLossError(self._failed)

    def _message(self, trainer: L.Trainer, step: int, value: str, good_loss: float, good_step: int) -> str:
        parts = [f"the training loss became {value} at step {step}"]
        if good_step >= 0:
            parts.append(f"the last finite loss was {good_loss:.6g} at step {good_step}")
        if self._last_logged is not None:
            logged_step, values = self._last_logged
            shown = ", ".join(f"{name}={value:.6g}" for name, value in sorted(values.items()))
            parts.append(f"last values logged (by step {logged_step}): {shown}")
        newest = _newest_checkpoint(trainer)
        advice = "a lower lr= (or a longer warm-up, warmup_epochs=), or check the data of that step"
        if newest is None:
            return "; ".join(parts) + f". No checkpoint was written; start again with {advice}"
        return ("; ".join(parts) + f". No checkpoint is written after step {step - 1}: the newest one, {newest}, is "
                f"from before it; resume from it with {advice}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check at the end of every epoch (the epoch's logged values are reduced on the host there)."""
        self.check(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse to save after a non-finite loss, or a ``state_dict`` with a non-finite floating-point tensor."""
        self.check(trainer)
        floats = [t for t in checkpoint.get("state_dict", {}).values()
                  if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]
        if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
            bad = next(name for name, t in checkpoint["state_dict"].items()
                       if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()))
            newest = _newest_checkpoint(trainer)
            self._failed = (f"{bad} holds NaN or infinite values at step {trainer.global_step} although the loss "
                            f"was finite: refusing to write this checkpoint "
                            f"({f'the newest one, {newest}, is kept' if newest else 'none was written before'}); "
                            "resume from the last good checkpoint with a lower lr=")
            raise NonFiniteLossError(self._failed)

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save: a resumed run starts a fresh record (only finite states are ever saved)."""
        return {}


def _newest_checkpoint(trainer: L.Trainer) -> Path | None:
    folders = {Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)}
    files = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None
