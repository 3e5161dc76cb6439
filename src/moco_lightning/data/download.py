"""Fail-fast downloads through torchvision's own dataset classes.

torchvision downloads with ``urllib`` and no timeout, which can hang offline. :func:`ensure_dataset_files` checks
the files first, resolves the host with a deadline, downloads under a short socket timeout, and turns every failure
into one :class:`DatasetNotAvailableError` naming the dataset, the folder and what to place there.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path

from moco_lightning.deadline import call_with_deadline

__all__ = ["DatasetNotAvailableError", "ensure_dataset_files", "missing_files"]


class DatasetNotAvailableError(RuntimeError):
    """A dataset is not on disk and could not be downloaded (the message says what to place where)."""


def missing_files(folder: str | os.PathLike[str], names: Sequence[str]) -> list[str]:
    """The entries of ``names`` that are not files inside ``folder``."""
    return [name for name in names if not os.path.isfile(os.path.join(folder, name))]


def _resolve_host(url: str, timeout: float) -> None:
    """Resolve the host of ``url`` within ``timeout`` seconds (DNS lookups ignore the socket timeout)."""
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname
    if host is None:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    call_with_deadline(lambda: socket.getaddrinfo(host, port), timeout, f"could not resolve {host}: the lookup")


def ensure_dataset_files(dataset: str, folder: str | os.PathLike[str], files: Sequence[str], *, download: bool,
                         url: str, download_fn: Callable[[], object], what_to_place: str,
                         timeout: float = 10.0) -> None:
    """Make sure ``files`` exist in ``folder``, downloading with ``download_fn`` when allowed.

    Args:
        dataset: human name used in messages ("CIFAR-10").
        folder: the folder the files must be in (e.g. ``<data_dir>/cifar-10-batches-py``).
        files: file names required inside ``folder``.
        download: whether a download may be attempted (the datamodule's ``download`` setting).
        url: where torchvision downloads from (for the messages and the DNS check).
        download_fn: performs the download (typically ``torchvision_class(root, download=True, ...)``).
        what_to_place: the sentence telling the user what to put into ``folder``.
        timeout: seconds allowed for the DNS lookup and for each socket operation of the download.

    Raises:
        DatasetNotAvailableError: files missing and ``download`` false, or the download failed.

    """
    folder = Path(folder)
    missing = missing_files(folder, files)
    if not missing:
        return
    where = f"{dataset}: missing {', '.join(missing)} in {folder}"
    if not download:
        raise DatasetNotAvailableError(
            f"{where}. Place there {what_to_place}, point data_dir at a folder that has them, or set "
            f"download=True to download it from {url}.")
    previous = socket.getdefaulttimeout()
    try:
        _resolve_host(url, timeout)
        socket.setdefaulttimeout(timeout)
        download_fn()
    except Exception as err:  # URLError, timeouts, md5 mismatch (RuntimeError), broken archive, ...
        raise DatasetNotAvailableError(
            f"{where}, and downloading it from {url} failed ({type(err).__name__}: {err}). If this machine is "
            f"offline, download the archive elsewhere and place {what_to_place} in {folder} (then set "
            "download=False), or point data_dir at a folder that already has it.") from err
    finally:
        socket.setdefaulttimeout(previous)
    missing = missing_files(folder, files)
    if missing:
        raise DatasetNotAvailableError(
            f"{dataset}: the download finished but {', '.join(missing)} are still missing in {folder}. Place "
            f"{what_to_place} there.")
