"""Checkpoint files that are either complete or absent: write a temporary file next to the target, then rename.

Lightning's ``TorchCheckpointIO`` writes through ``tempfile.mkstemp()``; when the temporary folder is on another file
system (node-local ``/tmp``, shared run folder) the final move is a copy, and a job killed during it leaves a
truncated ``last.ckpt``. :class:`AtomicCheckpointIO` writes ``<name>.partial-<pid>`` in the target's folder, fsyncs
it and ``os.replace``-s it over the target; a full disk is a :class:`DiskFullError` saying the old file is intact.
Works around Lightning issue #21253; goes with the release of PR #21744 (:mod:`moco_lightning.lightning_internals`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "DiskFullError", "PARTIAL_SUFFIX"]

log = logging.getLogger(__name__)

#: ``<name>.partial-<pid>``: the file a checkpoint is written to before it is renamed to ``<name>``.
PARTIAL_SUFFIX = ".partial-"
#: errno values that mean "no space left": ENOSPC, and EDQUOT (a user quota, as on cluster home folders).
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
#: below this many free bytes after a failed write, the failure is taken to be a full disk.
_NEARLY_FULL_BYTES = 1 << 20


class DiskFullError(OSError):
    """No space was left to write a checkpoint; nothing was overwritten and the earlier checkpoints are intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temporary file in the same folder, fsync, rename.

    Loading and removing are the parent's. Remote paths (``s3://``...) go to the parent unchanged: object stores
    publish a file only once it is complete. ``<name>.partial-<pid>`` files left behind by a process that was
    killed while writing are deleted at the next successful save of ``<name>``; auto-resume never picks them
    (they do not end in ``.ckpt``).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike[str],
                        storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path``, at all times the old file or the new (kept on ``DiskFullError``)."""
        if storage_options is not None or not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f"{target.name}{PARTIAL_SUFFIX}{os.getpid()}")
        try:
            with open(partial, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, target)
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if isinstance(err, Exception) and _is_disk_full(err, target.parent):
                full = DiskFullError(_disk_full_message(target))
                full.errno = errno.ENOSPC
                raise full from err
            raise
        _fsync_folder(target.parent)
        _remove_stale_partials(target)


def _is_local(path: str | os.PathLike[str]) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(get_filesystem(path), LocalFileSystem)


def _is_disk_full(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: an ENOSPC / EDQUOT anywhere in the chain, or almost no room left."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:  # torch.save wraps the OSError in a RuntimeError
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL:
            return True
        current = current.__cause__ or current.__context__
    try:
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _disk_full_message(target: Path) -> str:
    folder = target.parent
    if target.is_file():
        kept = f"the previous {target.name} is intact"
    else:
        others = sorted((p for p in folder.glob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime)
        kept = (f"the checkpoints already there are intact (newest: {others[-1].name})" if others
                else "no earlier checkpoint was there")
    return (f"the disk is full: no space left in {folder} to write the checkpoint {target.name}; nothing was "
            f"overwritten and {kept}. Free some space (or move the run folder to a larger disk) and resume with "
            "ckpt_path=auto")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _remove_stale_partials(target: Path) -> None:
    """Delete ``<name>.partial-<pid>`` files of processes that were killed while writing ``<name>``."""
    for stale in target.parent.glob(f"{target.name}{PARTIAL_SUFFIX}*"):
        try:
            stale.unlink()
            log.info("removed %s, left by a process killed while writing %s", stale, target.name)
        except OSError:
            pass
