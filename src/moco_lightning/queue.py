"""The dictionary of MoCo: a first-in first-out queue of L2-normalised keys (He et al. 2019, Sec. 3.2)."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moco_lightning.distributed import concat_all_gather


class KeyQueue(nn.Module):
    """A fixed-size FIFO queue of keys, the negatives of the contrastive loss.

    The buffer ``queue`` has shape ``(size, dim)`` (one key per row; the official code stores the transpose) and
    is allocated up front as random unit vectors. ``enqueue`` writes the keys of every process at ``ptr``
    (gathered with ``all_gather``, so all processes hold the same queue) and advances ``ptr`` modulo ``size``.
    Both buffers are part of the state dict, so a checkpoint resumes with the same dictionary.

    A third buffer, ``written_at``, holds for every slot the optimizer step (counted from 1) at which its key was
    written; 0 marks the random keys of the start. The age of a key is the current step minus its stamp
    (:func:`moco_lightning.diagnostics.key_ages`): how stale the dictionary is, in optimizer steps.

    As in the official code, ``size`` must be a multiple of the global batch so that a batch never straddles
    the end of the buffer; :meth:`check_batch` says so with the numbers before any compute happens.

    ``enqueue`` never reads the device: it writes at a host-side copy of ``ptr`` (reading ``ptr`` on a GPU would
    make the host wait for the device at every step). The copy follows ``enqueue`` and ``load_state_dict``; set
    ``ptr`` through those two only.
    """

    queue: torch.Tensor
    ptr: torch.Tensor
    written_at: torch.Tensor

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue_size and dim must be positive, got queue_size={size}, dim={dim}")
        self.size, self.dim = size, dim
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("written_at", torch.zeros(size, dtype=torch.long))
        self._ptr_host = 0  # == int(ptr), kept on the host

    def check_batch(self, global_batch: int) -> None:
        """Raise a clear error unless ``size`` is a positive multiple of ``global_batch`` (batch x processes)."""
        if global_batch < 1 or self.size % global_batch != 0:
            lower = max(global_batch, self.size // max(global_batch, 1) * global_batch)
            raise ValueError(
                f"queue_size={self.size} must be a multiple of the global batch size {global_batch} "
                f"(per-device batch x number of processes), so that every step writes a whole batch of keys; "
                f"use queue_size={lower} or {lower + global_batch}, or change the batch size"
            )

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, step: int | None = None) -> None:
        """Replace the oldest keys by ``keys`` gathered from every process (no gradient is kept).

        ``step`` is the optimizer step (from 1) the keys belong to, stamped into ``written_at``; ``None`` stamps
        one more than the newest stamp (so a queue used on its own counts its ``enqueue`` calls).
        """
        keys = concat_all_gather(keys.detach())
        n = keys.shape[0]
        self.check_batch(n)
        start = self._ptr_host
        self.queue[start : start + n] = keys.to(self.queue.dtype)
        # a Python int is a kernel argument; the None case stays a device tensor: neither copies to the host
        self.written_at[start : start + n] = self.written_at.max() + 1 if step is None else step
        self._ptr_host = (start + n) % self.size
        self.ptr.fill_(self._ptr_host)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """Load a queue; one saved before ``written_at`` existed gets every key stamped at step 0, with a warning."""
        if prefix + "queue" in state_dict and prefix + "written_at" not in state_dict:
            warnings.warn(
                "the checkpoint's key queue has no 'written_at' buffer (saved before key ages were tracked): "
                "every key counts as written at step 0, so the key ages logged read too old until the queue "
                "has been refilled once (queue_size / global batch steps)",
                stacklevel=2,
            )
            state_dict[prefix + "written_at"] = torch.zeros_like(self.written_at)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "ptr" in state_dict:
            self._ptr_host = int(state_dict[prefix + "ptr"])  # once, when a checkpoint is loaded

    def extra_repr(self) -> str:
        """Show size and width in the module summary."""
        return f"size={self.size}, dim={self.dim}"
