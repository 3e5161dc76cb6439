"""Helpers for running the same code on one process or many (``torch.distributed``).

Everything here degrades to the identity on a single process, so the MoCo module runs unchanged on a CPU, one
GPU, or many nodes under Lightning's DDP.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes in the default group (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """Rank of this process in the default group (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order. No gradient flows back.

    Every process must pass a tensor of the same shape. On a single process the input is returned as it is.
    """
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle BN, step 1 (He et al. 2019, Sec. 3.3): send each process a random slice of the global batch.

    The key images of all processes are gathered, permuted by one permutation drawn on rank 0 and broadcast,
    and each process keeps its own slice, so the batch-norm statistics of the key encoder are computed on a
    different subset of samples than the query encoder's and cannot leak which key is the positive.

    Returns:
        ``(x_shuffled_local, idx_unshuffle)``; pass ``idx_unshuffle`` to :func:`unshuffle_batch`.

    """
    if not is_distributed():  # one process: BN over the whole batch is permutation invariant, nothing to do
        return x, torch.arange(x.shape[0], device=x.device)
    local = x.shape[0]
    x_all = concat_all_gather(x)
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    mine = idx_shuffle.view(dist.get_world_size(), local)[dist.get_rank()]
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Shuffle BN, step 2: gather the encoded slices and give each process its own samples back, in order."""
    if not is_distributed():
        return x
    local = x.shape[0]
    x_all = concat_all_gather(x)
    mine = idx_unshuffle.view(dist.get_world_size(), local)[dist.get_rank()]
    return x_all[mine]


def convert_sync_batchnorm(module: torch.nn.Module, processes: int, device: torch.device | str) -> bool:
    """Turn every BatchNorm of ``module`` into ``SyncBatchNorm`` when training runs on several accelerator processes.

    MoCo v3 normalises with statistics of the global batch (the official code converts the whole model). One
    process needs nothing; CPU processes cannot (PyTorch's ``SyncBatchNorm`` runs on accelerators only), so there
    each process keeps its own batch statistics and a warning says so. Converts in place; returns whether it did.
    """
    if processes <= 1:
        return False
    if torch.device(device).type == "cpu":
        warnings.warn(
            f"{processes} CPU processes: BatchNorm stays per process (PyTorch's SyncBatchNorm needs GPUs); MoCo v3 "
            "normalises over the global batch on GPUs",
            stacklevel=2,
        )
        return False
    torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return True
