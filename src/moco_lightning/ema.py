"""The momentum update of the key encoder (He et al. 2019, Eq. 2), its schedules, and the hook that applies it.

:class:`MomentumUpdateAfterStep` is the small piece MoCo v1/v2 (:class:`moco_lightning.MoCo`) and MoCo v3
(:class:`moco_lightning.MoCoV3`) share: one momentum update after every optimizer step, with the scheduled m.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moco_lightning.lightning_internals import attached_trainer
from moco_lightning.scalars import device_scalar

#: Momentum schedules: m constant, or rising from its base value to 1 on a half cosine (BYOL; MoCo v3).
MOMENTUM_SCHEDULES = ("constant", "cosine")


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """Move every parameter of ``target`` towards ``online``: ``θ_t ← m·θ_t + (1 − m)·θ_o``.

    Only parameters are averaged; buffers (BN running statistics) are left alone, as in the official code, so
    the key encoder keeps its own statistics from its own forward passes. Uses fused multi-tensor ops
    (``torch._foreach_*``), one kernel launch for all tensors instead of a Python loop per parameter.
    ``online`` is the query encoder f_q, ``target`` the key encoder f_k; ``m`` in [0, 1] (1 freezes ``target``).
    """
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {m}")
    target_params = [p.data for p in target.parameters()]
    online_params = [p.data for p in online.parameters()]
    if len(target_params) != len(online_params):
        raise ValueError("online and target encoders have different numbers of parameters")
    if m == 1.0:
        return
    # lerp_(target, online, w) computes target + w·(online − target) = m·target + (1 − m)·online with w = 1 − m.
    torch._foreach_lerp_(target_params, online_params, 1.0 - m)


#: Trainer precisions that hold the weights themselves in 16 bits (Lightning's names).
HALF_PRECISION_WEIGHTS = ("16-true", "bf16-true", "transformer-engine-float16")


def check_weight_precision(precision: str | int | None) -> None:
    """Refuse a Trainer ``precision`` that holds the weights in 16 bits: the key encoder would stop moving.

    The momentum update moves each key weight by ``(1 − m)`` = 0.001 of its distance to the query weight, at or
    below the spacing of 16-bit numbers around it (bf16 keeps 8 significant bits, fp16 11): in bf16 most weights do
    not move at all, in fp16 the steps are off by about a tenth, and both get worse as the two encoders converge.
    Mixed precision keeps float32 weights and computes in 16 bits: the one-line ``ValueError`` names it.
    """
    if str(precision) in HALF_PRECISION_WEIGHTS:
        mixed = "bf16-mixed" if str(precision).startswith("bf16") else "16-mixed"
        raise ValueError(f"precision={precision} keeps the weights in 16 bits, where the key encoder's momentum "
                         "update (a step of 1 - m = 0.001 of the way) is lost to rounding, so the key encoder would "
                         f"not follow the query encoder; use precision={mixed} (float32 weights, "
                         "16-bit compute)")


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """Momentum rising from ``base`` to 1 on a half cosine over ``total_steps`` (BYOL; MoCo v3, Sec. 4).

    ``m = 1 − ½(1 + cos(π·step/total_steps))·(1 − base)``; steps past the end keep ``m = 1``.
    """
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)


class MomentumUpdateAfterStep:
    """LightningModule mixin: one momentum update of the momentum (key) encoder after every optimizer step.

    The host class sets ``self.m`` (the base momentum), has ``hparams.momentum_schedule`` (one of
    :data:`MOMENTUM_SCHEDULES`) and defines ``momentum_update(m)``; it lists this mixin before
    ``LightningModule``. The update after optimizer step ``j`` (counted from 1) uses ``m(j / total steps)``.
    """

    m: float

    def momentum_at(self, step: int) -> float:
        """The momentum m of the update that follows optimizer step number ``step`` (from 1)."""
        trainer = attached_trainer(self)
        if self.hparams.momentum_schedule == "cosine" and trainer is not None:
            return cosine_momentum(step, int(trainer.estimated_stepping_batches), self.m)
        return self.m

    @property
    def current_momentum(self) -> float:
        """The momentum m of the last update (of the next one, before the first step)."""
        trainer = attached_trainer(self)
        return self.momentum_at(trainer.global_step if trainer is not None else 0)

    def on_fit_start(self) -> None:
        """Refuse a precision that holds the weights in 16 bits (:func:`check_weight_precision`) before any step."""
        check_weight_precision(self.trainer.precision)
        super().on_fit_start()  # type: ignore[misc]

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the momentum update: once per optimizer step, logged as ``train/momentum``.

        Lightning calls this hook once per optimizer step (not per micro-batch of gradient accumulation) and
        before any callback's ``on_train_batch_end``, so a checkpoint written by a callback at any step holds a
        momentum encoder that has seen exactly as many updates as the trained encoder has seen steps.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        m = self.momentum_at(self.trainer.global_step + 1)  # the step counter moves after this hook
        self.momentum_update(m)
        self.log("train/momentum", device_scalar(self, "momentum", m))  # no host-device copy per step
