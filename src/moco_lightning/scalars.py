"""Python numbers logged from a step as tensors that already live on the module's device.

Logging a Python number (the lr, the momentum of the update) makes Lightning copy it to the device with a blocking
copy: a host-device synchronisation per step on a GPU. Filling a tensor that already lives there is a kernel launch
like any other, so the step never waits for the device.
"""

from __future__ import annotations

import torch
from torch import nn

_CACHE = "_device_scalars"


def device_scalar(module: nn.Module, name: str, value: float) -> torch.Tensor:
    """``value`` as a 0-d float tensor on ``module``'s device, one tensor per ``name``, refilled in place.

    The tensors are kept on the module (not in its state dict) and made again when the module moves to another
    device. ``module`` must have a ``device`` attribute, as every ``LightningModule`` has.
    """
    cache: dict[str, torch.Tensor] = module.__dict__.setdefault(_CACHE, {})
    device = module.device
    scalar = cache.get(name)
    if scalar is None or scalar.device != device:
        scalar = cache[name] = torch.zeros((), device=device)
    return scalar.fill_(value)
