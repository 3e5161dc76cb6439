"""The contrastive losses of MoCo: InfoNCE against a queue (v1/v2) or against the keys of the global batch (v3).

v1/v2: He et al. 2019, Eq. 1. v3: Chen, Xie, He 2021, Algorithm 1 and the official ``contrastive_loss``. Also the
accuracy of the (1+K)-way classification, computed on the device.

Precision: under mixed precision (``trainer.precision`` "bf16-mixed" or "16-mixed") the encoders run in half
precision, but the logits are computed here in float32, with autocast switched off: q and k are cast up, and the
queue is kept in float32 (:class:`~moco_lightning.queue.KeyQueue`). Half precision would cost too much here:
bfloat16 has an 8-bit mantissa, so a logit of 1/T = 14 (v1, T 0.07) is only resolved to about 0.06, and the
softmax over 1 + K logits (K up to 65,536) sums many such terms; float16 overflows exp for large logits. The
matrix product q·queue is a small part of a step's cost (``N x C x K`` multiply-adds against the encoders'
billions), so float32 costs little.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.nn import functional as F

from moco_lightning.distributed import concat_all_gather, rank


def info_nce_logits(
    q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, 1 + K)`` (positive in column 0) and labels (N zeros) of InfoNCE's (1+K)-way classification.

    ``q``, ``k`` (no gradient) are normalised ``(N, C)``, any floating dtype; ``queue`` the normalised negatives
    ``(K, C)`` before this step's keys; logits are divided by ``temperature``, in float32 (float64 inputs: float64).
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    with _autocast_off(q.device.type):  # float32 logits even under mixed precision
        q, k, queue = q.to(dtype), k.to(dtype), queue.to(dtype)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = q @ queue.t()
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return logits, labels


def _autocast_off(device_type: str) -> torch.autocast | nullcontext:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def info_nce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against the positive's index: the InfoNCE loss, averaged over the batch."""
    return F.cross_entropy(logits, labels)


def batch_contrastive_logits(q: torch.Tensor, k: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of MoCo v3's loss: each query against the keys of every process (official code).

    ``q`` and ``k`` are L2-normalised here; ``k`` is gathered from all processes in rank order (no gradient flows
    to it). ``logits = q · k_allᵀ / T`` is ``(N, N × world size)`` and the positive of query ``i`` on rank ``r`` is
    key ``i + N·r``, the same image's other view.
    """
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    with _autocast_off(q.device.type):  # float32 logits even under mixed precision
        q = F.normalize(q.to(dtype), dim=1)
        k = concat_all_gather(F.normalize(k.detach().to(dtype), dim=1))
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


def positive_rank_accuracy(logits: torch.Tensor, top_k: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Fraction of queries whose positive (column 0) is among the ``k`` largest logits, for each ``k``.

    The rank of the positive is the number of negatives with a larger logit; top-k accuracy is the fraction of rows
    where it is below k. Stays on the device (0-d float tensors, no host read) and allocates only one ``(N, K)``
    comparison, where a generic ``K+1``-class accuracy metric would build one-hot ``(N, K+1)`` matrices.
    """
    with torch.no_grad():
        above = (logits[:, 1:] > logits[:, :1]).sum(dim=1)  # the positive's rank among the 1 + K logits
        return [(above < k).float().mean() for k in top_k]


def batch_positive_accuracy(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Top-1 of MoCo v3's pretext task on this process's batch: queries whose own key is the most similar key.

    The positive of query ``i`` is key ``i``; the cosine similarities are ranked by :func:`positive_rank_accuracy`
    (ties count for the positive). The keys are not gathered from other processes: a metric costs no second
    collective per step, so under DDP it is the accuracy among ``N``, not ``N x world size``, keys.
    """
    with torch.no_grad(), _autocast_off(q.device.type):
        sim = F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).t()
        return positive_rank_accuracy(torch.cat([sim.diagonal().unsqueeze(1), sim], dim=1), (1,))[0]
