"""The dictionary of MoCo: a first-in first-out queue of L2-normalised keys (He et al. 2019, Sec. 3.2)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from moco_lightning.distributed import concat_all_gather


def check_queue_size(queue_size: int, batch_size: int, processes: int = 1, symmetric: bool = False) -> None:
    """Raise unless ``queue_size`` is a multiple of the keys one step enqueues, so no batch straddles the end.

    The keys of a step are ``batch_size x processes``, twice that with the symmetric loss (both views' keys). The
    one place this rule is written: the queue, the module and the training CLI call it.
    """
    keys = batch_size * processes * (2 if symmetric else 1)
    if keys >= 1 and queue_size % keys == 0:
        return
    lower = max(keys, queue_size // max(keys, 1) * keys)
    what = (f"twice the global batch size {batch_size * processes} (symmetric=True enqueues both views' keys; "
            if symmetric else f"the global batch size {keys} (")
    raise ValueError(f"queue_size={queue_size} must be a multiple of {what}batch_size={batch_size} x {processes} "
                     f"processes), so that every step writes whole batches of keys; use queue_size={lower} or "
                     f"{lower + keys}, or change batch_size")


def queue_fit_warning(queue_size: int, keys_per_step: int, num_images: int | None) -> str | None:
    """The warning for a queue not smaller than the training set, with a size to use; ``None`` when it fits.

    Such a queue holds keys of the queries' own images, so positives reappear among the negatives. The size
    suggested is about a tenth of the images, a multiple of ``keys_per_step``.
    """
    if num_images is None or queue_size < num_images:
        return None
    size = max(keys_per_step, num_images // 10 // keys_per_step * keys_per_step)
    return (f"queue_size={queue_size} is not smaller than the training set ({num_images} images): the queue would "
            f"hold keys of the queries' own images as negatives; use queue_size={size} (about a tenth of the images, "
            f"a multiple of the {keys_per_step} keys per step)")


class KeyQueue(nn.Module):
    """A fixed-size FIFO queue of keys, the negatives of the contrastive loss.

    The buffer ``queue`` has shape ``(size, dim)`` (one key per row; the official code stores the transpose) and
    is allocated up front as random unit vectors. ``enqueue`` writes the keys of every process at ``ptr``
    (gathered with ``all_gather``, so all processes hold the same queue) and advances ``ptr`` modulo ``size``.
    Both buffers are part of the state dict, so a checkpoint resumes with the same dictionary.

    A third buffer, ``written_at``, holds for every slot the optimizer step (counted from 1) at which its key was
    written; 0 marks the random keys of the start. The age of a key is the current step minus its stamp
    (:func:`moco_lightning.diagnostics.key_ages`): how stale the dictionary is, in optimizer steps.

    As in the official code, ``size`` must be a multiple of the keys one step enqueues so that a batch never
    straddles the end of the buffer (:func:`check_queue_size`).

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

    def check_batch(self, keys_per_step: int) -> None:
        """:func:`check_queue_size` of this queue for ``keys_per_step`` keys gathered from all processes."""
        check_queue_size(self.size, keys_per_step)

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
        """Load the buffers and the host-side copy of ``ptr``."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "ptr" in state_dict:
            self._ptr_host = int(state_dict[prefix + "ptr"])  # once, when a checkpoint is loaded

    def extra_repr(self) -> str:
        """Show size and width in the module summary."""
        return f"size={self.size}, dim={self.dim}"
