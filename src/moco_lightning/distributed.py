"""Helpers for running the same code on one process or many (``torch.distributed``).

Everything here degrades to the identity on a single process, so the MoCo module runs unchanged on a CPU, one
GPU, or many nodes under Lightning's DDP.
"""

from __future__ import annotations

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


def cpu_group() -> dist.ProcessGroup | None:
    """A group of all processes that reduces CPU tensors; ``None`` on one process. Every process must call it.

    The default group where its backend takes CPU tensors (gloo), else a new gloo group over the same processes
    (NCCL takes only CUDA tensors): a flag reduced there never waits for, or reads back from, the GPU.
    """
    if not is_distributed():
        return None
    if "gloo" in str(dist.get_backend()):
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def max_over_processes(value: int, group: dist.ProcessGroup | None) -> int:
    """The largest of the processes' ``value``, reduced on the CPU over ``group`` (:func:`cpu_group`; ``None``: own)."""
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return int(tensor.item())


@torch.no_grad()
def broadcast_batchnorm_statistics(module: torch.nn.Module, src: int = 0) -> None:
    """Give every process the BN running statistics of process ``src`` (nothing on one process).

    DDP sends rank 0's buffers at the start of each forward, but every process then updates them with its own
    batch, so after a step they differ a little. An evaluation that each process runs on its shard of the images
    (the kNN monitor and report) needs one model on all of them: rank 0's, the one its checkpoint holds.
    """
    if not is_distributed():
        return
    for layer in module.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked):
                if buffer is not None:
                    dist.broadcast(buffer, src=src)


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order. No gradient flows back.

    Every process must pass a tensor of the same shape. On a single process the input is returned as it is.
    """
    return concat_all_gather_dim(tensor, 0)


@torch.no_grad()
def concat_all_gather_dim(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along ``dim``, in rank order (the input on one process)."""
    if not is_distributed():
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=dim)


@torch.no_grad()
def shuffle_batch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle BN, step 1 (He et al. 2019, Sec. 3.3): send each process a random slice of the global batch.

    The key images of all processes are gathered, permuted by one permutation drawn on rank 0 and broadcast,
    and each process keeps its own slice, so the batch-norm statistics of the key encoder are computed on a
    different subset of samples than the query encoder's and cannot leak which key is the positive. Returns
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
