"""The speed options both modules share: channels-last layout and ``torch.compile`` of the backbones.

Neither changes the math: channels-last stores 4-D weights and activations as NHWC (the layout tensor-core GPUs
and oneDNN CPUs convolve fastest), compile turns the backbones' forward into fused kernels. Both are applied in
place, so parameter names, the state dict and checkpoints are the same with and without them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def memory_format(channels_last: bool) -> torch.memory_format:
    """``torch.channels_last`` or ``torch.contiguous_format``: the layout of encoders and image batches."""
    return torch.channels_last if channels_last else torch.contiguous_format


def to_layout(images: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """``images`` in layout ``fmt``; the same tensor when they already are (no copy), and 2-D/3-D inputs as given."""
    return images.contiguous(memory_format=fmt) if images.dim() == 4 else images


def compile_backbones(encoders: list[nn.Module], compile: bool | dict[str, Any]) -> None:
    """``torch.compile`` the ``backbone`` of every encoder in place (``nn.Module.compile``), compiled on first use.

    ``compile`` is ``False`` (nothing), ``True`` (torch's defaults) or a dict of ``torch.compile`` keywords, e.g.
    ``{"mode": "max-autotune"}``. Eval-mode passes (the kNN monitor) compile once more.
    """
    if not compile:
        return
    options = dict(compile) if isinstance(compile, dict) else {}
    for encoder in encoders:
        encoder.backbone.compile(**options)
