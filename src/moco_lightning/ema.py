"""The momentum update of the key encoder (He et al. 2019, Eq. 2) and its schedules."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, m: float) -> None:
    """Move every parameter of ``target`` towards ``online``: ``θ_t ← m·θ_t + (1 − m)·θ_o``.

    Only parameters are averaged; buffers (BN running statistics) are left alone, as in the official code, so
    the key encoder keeps its own statistics from its own forward passes. Uses fused multi-tensor ops
    (``torch._foreach_*``), one kernel launch for all tensors instead of a Python loop per parameter.

    Args:
        online: the query encoder f_q.
        target: the key encoder f_k, same architecture.
        m: momentum in [0, 1]: 0 copies ``online``, 1 freezes ``target``.

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


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """Momentum rising from ``base`` to 1 on a half cosine over ``total_steps`` (BYOL; MoCo v3, Sec. 4).

    ``m = 1 − ½(1 + cos(π·step/total_steps))·(1 − base)``; steps past the end keep ``m = 1``.
    """
    if total_steps <= 0:
        return base
    progress = min(max(step / total_steps, 0.0), 1.0)
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - base)
