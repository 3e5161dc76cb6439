"""What the dictionary looks like during training: the numbers behind MoCo's "large and consistent" claim.

MoCo's argument (He et al. 2019, Sec. 3.2) is that the dictionary of keys must be *large* (the queue) and
*consistent* (the slowly moving key encoder). These functions measure both, and the representation without labels:

* :func:`parameter_drift`: how far the key encoder is from the query encoder, ``||θk − θq|| / ||θq||``.
* :func:`key_ages`: how many optimizer steps ago the keys of the queue were written (oldest and mean).
* :func:`similarity_stats`: the positive's similarity against the negatives of the queue, from the logits.
* :func:`alignment` and :func:`uniformity`: Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere", Sec. 4.1: positives close, embeddings spread.

Every function returns tensors on their device: nothing here waits for the device.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DRIFT_CHUNK_NUMEL", "alignment", "key_ages", "parameter_drift", "similarity_stats", "uniformity"]


#: Parameters differenced per fused call of :func:`parameter_drift` (16 MB of float32 temporaries at a time).
DRIFT_CHUNK_NUMEL = 1 << 22


@torch.no_grad()
def parameter_drift(online: nn.Module, target: nn.Module, chunk_numel: int = DRIFT_CHUNK_NUMEL) -> torch.Tensor:
    """Relative distance of ``target``'s parameters from ``online``'s: ``||θ_t − θ_o|| / ||θ_o||`` (0-d tensor).

    Fused multi-tensor ops over groups of about ``chunk_numel`` elements. The difference is formed explicitly:
    ``||a||² + ||b||² − 2a·b`` would cancel catastrophically in float32 for encoders this close.
    """
    online_params = [p.detach() for p in online.parameters()]
    target_params = [p.detach() for p in target.parameters()]
    if len(online_params) != len(target_params) or not online_params:
        raise ValueError(
            f"parameter_drift needs two encoders with the same parameters, got {len(online_params)} and "
            f"{len(target_params)} parameter tensors"
        )
    distances: list[torch.Tensor] = []
    start = 0
    while start < len(online_params):
        stop, size = start, 0
        while stop < len(online_params) and (size == 0 or size + online_params[stop].numel() <= chunk_numel):
            size += online_params[stop].numel()
            stop += 1
        differences = torch._foreach_sub(target_params[start:stop], online_params[start:stop])
        distances.extend(torch._foreach_norm(differences))
        start = stop
    distance = torch.linalg.vector_norm(torch.stack(distances).float())
    scale = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(online_params)).float())
    return distance / scale.clamp_min(torch.finfo(torch.float32).tiny)


@torch.no_grad()
def key_ages(written_at: torch.Tensor, step: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ages in optimizer steps of the keys of a queue: ``(oldest, mean)`` as float 0-d tensors.

    Args:
        written_at: ``(K,)`` the step at which each slot's key was written
            (:attr:`moco_lightning.queue.KeyQueue.written_at`; 0 = the random keys of the start).
        step: the current optimizer step, counted as ``written_at`` counts (a key written at this step has age 0).

    """
    ages = (step - written_at).float()
    return ages.max(), ages.mean()


@torch.no_grad()
def similarity_stats(logits: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Cosine similarities of the queries to their positive and to the queue, from MoCo's logits.

    Args:
        logits: ``(N, 1 + K)`` InfoNCE logits divided by the temperature, the positive in column 0.
        temperature: the T the logits were divided by.

    Returns:
        ``pos_sim`` (mean similarity to the positive key), ``neg_sim`` (mean over the queue's negatives),
        ``hardest_neg_sim`` (mean over queries of the most similar negative) and ``sim_gap`` (``pos_sim −
        neg_sim``): a dictionary the model can tell apart from its positives has a large gap.

    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, 1 + K) with K >= 1 negatives, got shape {tuple(logits.shape)}")
    # reductions of the logits as they are, then scaled: no (N, 1 + K) copy (256 x 65,537 floats are 67 MB)
    logits = logits.detach()
    pos, neg = logits[:, 0], logits[:, 1:]
    stats = {
        "pos_sim": pos.mean(dtype=torch.float32) * temperature,
        "neg_sim": neg.mean(dtype=torch.float32) * temperature,
        "hardest_neg_sim": neg.amax(dim=1).mean(dtype=torch.float32) * temperature,
    }
    stats["sim_gap"] = stats["pos_sim"] - stats["neg_sim"]
    return stats


@torch.no_grad()
def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """Alignment of positive pairs: ``E ||z1 − z2||^α`` over the rows (Wang & Isola 2020, Eq. 4; α = 2 there).

    ``z1`` and ``z2`` are ``(N, D)`` L2-normalised embeddings of two views of the same N images. 0 when every
    pair coincides, 4 (for α = 2) when each pair points in opposite directions: lower is better.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"alignment needs two views of the same images, got shapes {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    return (z1.float() - z2.float()).norm(dim=1).pow(alpha).mean()


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Uniformity of embeddings: ``log E exp(−t ||z_i − z_j||²)`` over pairs i < j (Wang & Isola 2020, Eq. 5; t 2).

    ``z`` is ``(N, D)`` L2-normalised, N >= 2. Lower is better (more spread out on the sphere); 0 when all rows
    coincide. Uses ``logsumexp`` for stability and ``N (N − 1) / 2`` pairwise distances: pass a subset for large N.
    """
    n = z.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 embeddings, got {n}")
    squared = torch.pdist(z.float(), p=2).pow(2)
    return torch.logsumexp(-t * squared, dim=0) - math.log(squared.numel())
