"""Optimizers and learning-rate schedules of the MoCo recipes, and the numbers they need from the Trainer.

Optimizers: SGD (v1/v2), LARS (v3, ResNet) and AdamW (v3, ViT): :func:`build_optimizer`. Schedules are written in
epochs, as the papers state them, and applied per optimizer step through ``LambdaLR`` (:func:`lr_lambda`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only

from moco_lightning.lightning_internals import setup_train_data

log = logging.getLogger(__name__)

#: Learning-rate schedules understood by :func:`lr_lambda`.
LR_SCHEDULES = ("step", "cosine", "constant")
#: When the lr changes: once per epoch (official v1/v2) or at every optimizer step (v3).
LR_INTERVALS = ("epoch", "step")
#: Optimizers understood by :func:`build_optimizer`.
OPTIMIZERS = ("sgd", "lars", "adamw")


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr = base_lr × global_batch / 256``."""
    return base_lr * global_batch / reference_batch


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as the official MoCo v3 code applies it (``moco/optimizer.py``).

    For a parameter ``w`` with gradient ``g``, per step::

        d  = g + weight_decay · w
        d ← d · trust_coefficient · ‖w‖ / ‖d‖      (1 instead of the ratio when ‖w‖ = 0 or ‖d‖ = 0)
        μ ← momentum · μ + d                        (μ starts at 0)
        w ← w − lr · μ

    With ``exclude_1d`` 1-D parameters skip the first two lines. Not timm's ``Lars``: its trust ratio divides by
    ``‖g‖ + weight_decay·‖w‖``, not the official ``‖g + weight_decay·w‖``, and it decays 1-D parameters.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: L2 penalty added to the gradient before the trust ratio (official ResNet-50: 1e-6).
        momentum: momentum of the update (official: 0.9).
        trust_coefficient: η of the trust ratio (official: 0.001).
        exclude_1d: leave parameters with ``ndim <= 1`` out of weight decay and the trust ratio (official: on).

    """

    def __init__(self, params: Iterable[Any], lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001, exclude_1d: bool = True) -> None:
        if lr < 0 or weight_decay < 0 or momentum < 0 or trust_coefficient <= 0:
            raise ValueError(f"LARS needs lr, weight_decay, momentum >= 0 and trust_coefficient > 0, got lr={lr}, "
                             f"weight_decay={weight_decay}, momentum={momentum}, trust_coefficient={trust_coefficient}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient,
                        exclude_1d=exclude_1d)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One LARS step over every parameter that has a gradient; returns the closure's loss if given one."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1 or not group["exclude_1d"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    ratio = torch.where((w_norm > 0) & (d_norm > 0),
                                        group["trust_coefficient"] * w_norm / d_norm, torch.ones_like(w_norm))
                    d = d.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(d)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "sgd",
    lr: float = 0.03,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    trust_coefficient: float = 0.001,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimizer of a MoCo recipe, with weight decay on every parameter as the official code does.

    ``"sgd"`` (v1/v2; torch's fused SGD on contiguous parameters), ``"lars"`` (v3, ResNet: :class:`LARS`) or
    ``"adamw"`` (v3, ViT; ``momentum`` unused). The other arguments are those optimizers' own.
    """
    if name == "sgd":
        params = list(params)
        # Contiguous parameters only: torch 2.14's fused CPU kernel updates a channels-last parameter wrongly when
        # its gradient comes in the other layout (tests/test_optim.py shows it); channels_last models use foreach.
        fused = bool(params) and all(
            isinstance(p, torch.Tensor) and p.is_floating_point() and p.is_contiguous()
            and p.device.type in ("cpu", "cuda") for p in params
        )
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)
    if name == "lars":
        return LARS(params, lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
    if name == "adamw":
        b1, b2 = (float(b) for b in betas)
        return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def lr_lambda(
    schedule: str,
    total_steps: int,
    steps_per_epoch: float,
    milestones: Sequence[float] = (120, 160),
    warmup_epochs: float = 0,
    gamma: float = 0.1,
    interval: str = "step",
) -> Callable[[int], float]:
    """The factor applied to the base lr at each optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    As the official scripts: a linear warm-up from 0 (MoCo v3), then ``"cosine"`` (v2, v3), ``"step"`` (``gamma``
    at each milestone epoch passed; v1: 0.1 at 120 and 160 of 200) or ``"constant"``.

    Args:
        schedule: ``"step"``, ``"cosine"`` or ``"constant"``.
        total_steps: optimizer steps of the whole run (the cosine reaches 0 there).
        steps_per_epoch: optimizer steps per epoch, to turn epochs (milestones, warm-up) into steps.
        milestones: epochs at which the step schedule decays.
        warmup_epochs: linear warm-up over this many epochs (0: none).
        gamma: decay factor of the step schedule.
        interval: ``"step"`` (the lr moves every step) or ``"epoch"`` (it is the value at the start of the epoch).

    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if interval not in LR_INTERVALS:
        raise ValueError(f"unknown lr_interval {interval!r}; choose one of {LR_INTERVALS}")
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    total_epochs = total_steps / steps_per_epoch

    def factor(step: int) -> float:
        epoch = step / steps_per_epoch
        if interval == "epoch":
            epoch = math.floor(epoch + 1e-9)
        if epoch < warmup_epochs:
            return epoch / warmup_epochs
        if schedule == "cosine":
            span = total_epochs - warmup_epochs
            progress = min((epoch - warmup_epochs) / span, 1.0) if span > 0 else 1.0
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if schedule == "step":
            return gamma ** sum(epoch >= m for m in milestones)
        return 1.0

    return factor


class ResumableLambdaLR(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` that restores its position from a checkpoint but keeps the base lrs of the current run.

    A plain ``LambdaLR`` (and Lightning, for the optimizer) restores the old run's lrs, so a run resumed with
    another global batch would keep the lr scaled for the old one; this one takes only the step count.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step count; keep (and apply) this run's base lrs."""
        base_lrs = list(self.base_lrs)
        saved = [float(lr) for lr in state_dict.get("base_lrs", base_lrs)]
        super().load_state_dict(state_dict)
        self.base_lrs = base_lrs
        for group, base, factor in zip(self.optimizer.param_groups, base_lrs, self.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if any(not math.isclose(a, b, rel_tol=1e-12) for a, b in zip(saved, base_lrs)):
            _log_rescaled(saved, base_lrs)


@rank_zero_only
def _log_rescaled(saved: list[float], current: list[float]) -> None:
    log.info("the lr follows this run's global batch: base lr %s in the checkpoint, %s now (lr scaling by the "
             "global batch; the schedule continues from the checkpoint's step)",
             ", ".join(f"{lr:.6g}" for lr in saved), ", ".join(f"{lr:.6g}" for lr in current))


# ---------------------------------------------------------------------------------------------- from the Trainer
def steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps in one epoch of the training loader (after ``limit_train_batches``, with accumulation).

    Read from the loader, not from ``max_steps``, so epochs keep their length when a run is cut short.
    """
    if trainer.train_dataloader is None:
        setup_train_data(trainer)
    batches = trainer.num_training_batches
    if batches in (None, 0) or math.isinf(batches):
        raise ValueError("the training loader has no known length; epoch-based lr schedules need a sized loader")
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def per_device_batch_size(trainer: Any) -> int:
    """The training batch of one process: the datamodule's ``batch_size``, else the training loader's."""
    batch = getattr(getattr(trainer, "datamodule", None), "batch_size", None)
    if batch is None:
        batch = getattr(trainer.train_dataloader, "batch_size", None)
    if batch is None:
        raise ValueError("scale_lr=True needs the batch size: use a datamodule with a batch_size attribute")
    return int(batch)


def images_per_optimizer_step(batch_size: int, processes: int = 1, accumulate_grad_batches: int = 1) -> int:
    """The global batch: images per optimizer step over all processes, the batch of the lr scaling rule.

    The one definition. (The queue counts keys per forward step, without accumulation:
    :func:`moco_lightning.queue.check_queue_size`.)
    """
    return int(batch_size) * int(processes) * int(accumulate_grad_batches)


def trainer_images_per_optimizer_step(trainer: Any) -> int:
    """:func:`images_per_optimizer_step` of a Trainer's run."""
    return images_per_optimizer_step(per_device_batch_size(trainer), trainer.world_size,
                                     trainer.accumulate_grad_batches)


def configure_optimization(
    trainer: Any,
    params: Iterable[torch.nn.Parameter],
    *,
    optimizer: str,
    lr: float,
    scale_lr: bool,
    momentum: float,
    weight_decay: float,
    lr_schedule: str,
    lr_interval: str = "step",
    lr_milestones: Sequence[float] = (),
    warmup_epochs: float = 0,
    trust_coefficient: float = 0.001,
    betas: Sequence[float] = (0.9, 0.999),
) -> dict[str, Any]:
    """The ``configure_optimizers`` result of a MoCo module: optimizer and per-step :class:`ResumableLambdaLR`.

    ``lr`` is the base lr per 256 images when ``scale_lr`` (``lr × global batch / 256``), else the lr itself.
    ``trust_coefficient`` (LARS) and ``betas`` (AdamW) go to :func:`build_optimizer`.
    """
    estimated = trainer.estimated_stepping_batches
    if math.isinf(estimated):
        raise ValueError("the lr schedule needs the length of the run: give the Trainer max_epochs= or max_steps=")
    total_steps = max(int(estimated), 1)
    factor = lr_lambda(lr_schedule, total_steps, steps_per_epoch(trainer), lr_milestones, warmup_epochs,
                       interval=lr_interval)
    if scale_lr:
        lr = scaled_lr(lr, trainer_images_per_optimizer_step(trainer))
    opt = build_optimizer(params, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay,
                          trust_coefficient=trust_coefficient, betas=betas)
    scheduler = ResumableLambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
