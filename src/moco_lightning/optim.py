"""Optimizers and learning-rate schedules of the MoCo recipes, expressed per optimizer step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

#: Learning-rate schedules understood by :func:`lr_lambda`.
LR_SCHEDULES = ("step", "cosine", "constant")
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

    The official code decays every parameter (BN and biases included); so does this.
    """
    if name != "sgd":
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def lr_lambda(
    schedule: str,
    total_steps: int,
    steps_per_epoch: float,
    milestones: Sequence[float] = (120, 160),
    warmup_epochs: float = 0,
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """The factor applied to the base lr at each optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    Args:
        schedule: ``"step"`` (×``gamma`` at each milestone epoch: MoCo v1, 0.1 at 120 and 160 of 200 epochs),
            ``"cosine"`` (half cosine from 1 to 0 over all steps: MoCo v2) or ``"constant"``.
        total_steps: number of optimizer steps in the whole run.
        steps_per_epoch: optimizer steps per epoch, to turn epochs (milestones, warm-up) into steps.
        milestones: epochs at which the step schedule decays.
        warmup_epochs: linear warm-up from ~0 to the base lr over this many epochs (0: none).
        gamma: decay factor of the step schedule.

    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    warmup_steps = warmup_epochs * steps_per_epoch
    milestone_steps = sorted(m * steps_per_epoch for m in milestones)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            span = max(total_steps - warmup_steps, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min((step - warmup_steps) / span, 1.0)))
        if schedule == "step":
            return gamma ** sum(step >= m for m in milestone_steps)
        return 1.0

    return factor
