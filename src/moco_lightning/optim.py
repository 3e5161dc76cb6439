"""Optimizers and learning-rate schedules of the MoCo recipes, and the numbers they need from the Trainer.

Schedules are written in epochs, as the papers state them, and applied per optimizer step through
``torch.optim.lr_scheduler.LambdaLR``: ``lr_interval="epoch"`` holds the lr constant within an epoch, as the
official v1/v2 code does (``adjust_learning_rate`` once at the start of each epoch); ``"step"`` moves it at every
optimizer step, as MoCo v3 does. Steps per epoch come from the loader (:func:`steps_per_epoch`), so warm-up and
milestones stay at the right place when a run is cut short by ``max_steps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

#: Learning-rate schedules understood by :func:`lr_lambda`.
LR_SCHEDULES = ("step", "cosine", "constant")
#: When the lr changes: once per epoch (official v1/v2) or at every optimizer step (v3).
LR_INTERVALS = ("epoch", "step")
#: Optimizers understood by :func:`build_optimizer` (LARS arrives with MoCo v3).
OPTIMIZERS = ("sgd",)


def scaled_lr(base_lr: float, global_batch: int, reference_batch: int = 256) -> float:
    """The linear scaling rule (Goyal et al. 2017): ``lr = base_lr × global_batch / 256``."""
    return base_lr * global_batch / reference_batch


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "sgd",
    lr: float = 0.03,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
) -> torch.optim.Optimizer:
    """The optimizer of MoCo v1/v2: SGD with momentum 0.9 and weight decay 1e-4 on every parameter.

    The official code decays every parameter (BN and biases included); so does this. Parameters on the CPU or a
    CUDA device are updated by torch's fused SGD (the same update in one kernel over all tensors: half the time of
    the per-tensor loop on the CPU here, benchmarks/RESULTS.md).
    """
    if name != "sgd":
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    params = list(params)
    fused = bool(params) and all(isinstance(p, torch.Tensor) and p.is_floating_point()
                                 and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, fused=fused or None)


def lr_factor(
    epoch: float,
    schedule: str,
    total_epochs: float,
    milestones: Sequence[float] = (120, 160),
    warmup_epochs: float = 0,
    gamma: float = 0.1,
) -> float:
    """The factor of the base lr at a (possibly fractional) ``epoch``, as the official scripts compute it.

    Warm-up: ``epoch / warmup_epochs`` (official MoCo v3; 0 at the very first step). After it, ``"cosine"`` is
    ``½(1 + cos(π·(epoch − warmup) / (total − warmup)))`` (v2, v3), ``"step"`` multiplies by ``gamma`` at each
    milestone epoch passed (v1: 0.1 at 120 and 160 of 200) and ``"constant"`` is 1.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if epoch < warmup_epochs:
        return epoch / warmup_epochs
    if schedule == "cosine":
        span = total_epochs - warmup_epochs
        progress = min((epoch - warmup_epochs) / span, 1.0) if span > 0 else 1.0
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        return gamma ** sum(epoch >= m for m in milestones)
    return 1.0


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

    Args:
        schedule: ``"step"``, ``"cosine"`` or ``"constant"`` (see :func:`lr_factor`).
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
        return lr_factor(epoch, schedule, total_epochs, milestones, warmup_epochs, gamma)

    return factor


# ---------------------------------------------------------------------------------------------- from the Trainer
def steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps in one epoch of the training loader (after ``limit_train_batches``, with accumulation).

    Read from the loader, not from ``max_steps``, so epochs keep their length when a run is cut short.
    """
    if trainer.train_dataloader is None:  # as Trainer.estimated_stepping_batches does when it needs the loader
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    if batches in (None, 0) or math.isinf(batches):
        raise ValueError("the training loader has no known length; epoch-based lr schedules need a sized loader")
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


def global_batch_size(trainer: Any) -> int:
    """Images per optimizer step over all processes: per-device batch × processes × accumulation."""
    datamodule = getattr(trainer, "datamodule", None)
    batch = getattr(datamodule, "batch_size", None)
    if batch is None:
        batch = getattr(trainer.train_dataloader, "batch_size", None)
    if batch is None:
        raise ValueError("scale_lr=True needs the batch size: use a datamodule with a batch_size attribute")
    return int(batch) * trainer.world_size * trainer.accumulate_grad_batches


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
) -> dict[str, Any]:
    """The ``configure_optimizers`` result of a MoCo module: optimizer and per-step ``LambdaLR``.

    ``lr`` is the base lr per 256 images when ``scale_lr`` (``lr × global batch / 256``), else the lr itself.
    """
    estimated = trainer.estimated_stepping_batches
    if math.isinf(estimated):
        raise ValueError("the lr schedule needs the length of the run: set trainer.max_epochs or trainer.max_steps")
    total_steps = max(int(estimated), 1)
    factor = lr_lambda(lr_schedule, total_steps, steps_per_epoch(trainer), lr_milestones, warmup_epochs,
                       interval=lr_interval)
    if scale_lr:
        lr = scaled_lr(lr, global_batch_size(trainer))
    opt = build_optimizer(params, optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
