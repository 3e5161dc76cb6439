"""The contrastive losses of MoCo: InfoNCE against a queue (v1/v2) or against the keys of the global batch (v3).

v1/v2: He et al. 2019, Eq. 1. v3: Chen, Xie, He 2021, Algorithm 1 and the official ``contrastive_loss``.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from moco_lightning.distributed import concat_all_gather, rank


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


def batch_contrastive_logits(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of MoCo v3's loss: each query against the keys of every process (official code).

    ``q`` and ``k`` are L2-normalised here; ``k`` is gathered from all processes in rank order (no gradient flows
    to it). ``logits = q · k_allᵀ / T`` is ``(N, N × world size)`` and the positive of query ``i`` on rank ``r`` is
    key ``i + N·r``, the same image's other view.
    """
    q = F.normalize(q, dim=1)
    k = concat_all_gather(F.normalize(k.detach(), dim=1))
    logits = q @ k.t() / temperature
    n = logits.shape[0]
    labels = torch.arange(n, dtype=torch.long, device=logits.device) + n * rank()
    return logits, labels


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3's contrastive loss of one direction: ``2T · CE(q · k_allᵀ / T, arange(N) + N·rank)``.

    The factor 2T is the official code's (it makes the loss's scale independent of T); the training loss is the
    symmetrised sum ``moco_v3_loss(q1, k2) + moco_v3_loss(q2, k1)``. See :func:`batch_contrastive_logits`.
    """
    logits, labels = batch_contrastive_logits(q, k, temperature)
    return F.cross_entropy(logits, labels) * (2 * temperature)
