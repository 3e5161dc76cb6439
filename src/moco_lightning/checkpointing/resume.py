"""Which checkpoint to resume from, and whether it can be: readable, a training checkpoint, of this model.

* :func:`read_training_checkpoint` checks one file before Lightning does (a file, a zip whose CRCs match,
  loadable with ``weights_only=True``, holding weights, optimizer and loops).
* :func:`find_resume_checkpoint` is ``ckpt_path=auto``: the newest valid checkpoint, skipping (with a warning
  naming each one) those that fail.
* :func:`check_checkpoint_matches` names both shapes of any tensor that differs from the model's, before compute.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["ResumeError", "check_checkpoint_matches", "check_checkpoint_path", "find_resume_checkpoint",
           "read_training_checkpoint"]

log = logging.getLogger(__name__)

#: What a checkpoint needs to resume training (an exported backbone or a weights-only file lacks some).
TRAINING_KEYS = ("state_dict", "optimizer_states", "loops", "global_step", "epoch")
#: Hyper-parameters that fix the shapes of a MoCo model, compared when a checkpoint does not fit.
_SHAPE_HPARAMS = ("backbone", "cifar_stem", "dim", "queue_size", "mlp", "hidden_dim", "feature_dim")


class ResumeError(ValueError):
    """A checkpoint that training cannot resume from; the message names the file and what to do."""


def check_checkpoint_path(path: str | Path, setting: str = "ckpt_path") -> Path:
    """The checkpoint file ``path`` names (``~`` expanded); ``ResumeError`` for a folder or a missing path."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise ResumeError(f"{setting}={str(path)!r} is a folder, not a checkpoint file; pass a file such as "
                          f"{file / 'last.ckpt'}, or ckpt_path=auto (moco-train) to resume from the newest valid "
                          "checkpoint of the run folder")
    if not file.is_file():
        raise ResumeError(f"{setting}={str(path)!r} does not exist; pass the path of a checkpoint to resume from, "
                          "e.g. outputs/<date>/<time>/checkpoints/last.ckpt, or ckpt_path=auto")
    return file


def read_training_checkpoint(path: str | Path, setting: str = "ckpt_path") -> dict[str, Any]:
    """Open a checkpoint to resume from, memory-mapped (tensors are read lazily), after checking it.

    ``setting`` names it in the messages. ``ResumeError``: missing, a folder, truncated or damaged (zip CRC), not
    loadable with ``weights_only=True``, or not a training checkpoint.
    """
    file = check_checkpoint_path(path, setting)
    try:
        with zipfile.ZipFile(file) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ResumeError(f"{file} is not a readable checkpoint ({type(err).__name__}: {_first_line(err)}): it is "
                          "truncated or corrupt, or not a PyTorch checkpoint file") from None
    if damaged is not None:
        raise ResumeError(f"{file} is corrupt: its entry {damaged} fails the CRC check")
    try:
        checkpoint = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means "cannot resume from this file"
        raise ResumeError(f"{file} cannot be loaded as a checkpoint ({type(err).__name__}: {_first_line(err)})") \
            from None
    missing = [key for key in TRAINING_KEYS if not isinstance(checkpoint, Mapping) or key not in checkpoint]
    if missing:
        raise ResumeError(f"{file} is not a training checkpoint: it has no {', '.join(missing)} (an exported "
                          "backbone or a weights-only checkpoint cannot resume training); pass a .ckpt that "
                          "moco-train wrote in <run folder>/checkpoints/")
    return dict(checkpoint)


def find_resume_checkpoint(folders: Iterable[str | Path]) -> tuple[Path, dict[str, Any]] | None:
    """``ckpt_path=auto``: the newest valid ``*.ckpt`` of ``folders`` and its contents, or ``None`` if none.

    Newest by modification time. A file that fails :func:`read_training_checkpoint` is skipped with a warning
    that names it and says why, and the one before it is tried.
    """
    candidates = {p.resolve() for folder in folders if Path(folder).is_dir() for p in Path(folder).glob("*.ckpt")
                  if p.is_file()}
    for path in sorted(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True):
        try:
            return path, read_training_checkpoint(path)
        except ResumeError as err:
            log.warning("ckpt_path=auto: skipping %s: %s; trying the checkpoint before it", path, err)
    return None


def check_checkpoint_matches(checkpoint: Mapping[str, Any], model: nn.Module, path: str | Path = "<checkpoint>"
                             ) -> None:
    """Raise a :class:`ResumeError` naming both shapes when the checkpoint's tensors do not fit ``model``.

    Compares every entry of the checkpoint's ``state_dict`` with ``model.state_dict()`` (names and shapes), and
    lists the shape-defining hyper-parameters (backbone, dim, queue_size, ...) that differ.
    """
    saved = checkpoint.get("state_dict", {})
    own = model.state_dict()
    shapes = [(key, tuple(saved[key].shape), tuple(value.shape)) for key, value in own.items()
              if key in saved and tuple(saved[key].shape) != tuple(value.shape)]
    shapes.sort(key=lambda entry: "key_queue." not in entry[0])  # the queue first: it shows queue_size and dim
    missing = [key for key in own if key not in saved]
    unexpected = [key for key in saved if key not in own]
    if not (shapes or missing or unexpected):
        return
    details = [f"{_describe(key)} is {a} in the checkpoint but {b} in this run" for key, a, b in shapes[:3]]
    if len(shapes) > 3:
        details.append(f"{len(shapes) - 3} more tensors differ in shape")
    if missing:
        details.append(f"{len(missing)} tensors of this model are not in the checkpoint (first {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} tensors of the checkpoint are not in this model (first {unexpected[0]})")
    saved_hp = dict(checkpoint.get("hyper_parameters") or {})
    own_hp = dict(getattr(model, "hparams", {}) or {})
    differing = [f"model.{name}={saved_hp[name]!r} there vs {own_hp[name]!r} here" for name in _SHAPE_HPARAMS
                 if name in saved_hp and name in own_hp and saved_hp[name] != own_hp[name]]
    settings = f" ({'; '.join(differing)})" if differing else ""
    raise ResumeError(f"checkpoint {path} does not fit this model{settings}: {'; '.join(details)}. Resume with the "
                      "settings the checkpoint was trained with (its composed config is stored in it under "
                      "'moco_lightning'), or start a new run without ckpt_path")


def _describe(key: str) -> str:
    if key.endswith("key_queue.queue"):
        return "the queue (queue_size, dim)"
    if key.endswith("key_queue.ptr"):
        return "the queue pointer"
    return key


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""
