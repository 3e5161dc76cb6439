"""Fixtures of the data tests: md5 bypass for fake CIFAR / STL files, no network."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def skip_md5(monkeypatch):
    """Accept the fake CIFAR / STL files: torchvision checks the md5 of the real release, which tiny fake files
    cannot match. Only the checksum is bypassed (a file must still exist); torchvision still parses the files."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    monkeypatch.setattr(cifar, "check_integrity", exists)
    monkeypatch.setattr(stl10, "check_integrity", exists)


@pytest.fixture
def no_network(monkeypatch):
    """Every network entry point raises at once; returns the list of attempted calls."""
    import socket
    import urllib.error
    import urllib.request

    calls: list[str] = []

    def refuse_dns(host, *args, **kwargs):
        calls.append(f"getaddrinfo {host}")
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    def refuse_url(*args, **kwargs):
        calls.append("urlopen")
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_dns)
    monkeypatch.setattr(urllib.request, "urlopen", refuse_url)
    return calls
