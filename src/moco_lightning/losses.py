"""The InfoNCE loss of MoCo (He et al. 2019, Eq. 1)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def info_nce_logits(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the (1+K)-way classification that InfoNCE solves.

    Args:
        q: normalised queries ``(N, C)``.
        k: normalised positive keys ``(N, C)``, no gradient needed.
        queue: normalised negatives ``(K, C)``: the dictionary as it was before this step's keys.
        temperature: T; logits are divided by it.

    Returns:
        ``logits`` of shape ``(N, 1 + K)`` with the positive in column 0, and ``labels``, N zeros.

    """
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = q @ queue.t()
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits, labels


def info_nce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against the positive's index: the InfoNCE loss, averaged over the batch."""
    return F.cross_entropy(logits, labels)
