import socket
import time

import pytest

from moco_lightning.data import CIFAR10DataModule, CIFAR100DataModule, DatasetNotAvailableError, STL10DataModule


@pytest.mark.parametrize(("cls", "folder", "a_file"), [
    (CIFAR10DataModule, "cifar-10-batches-py", "data_batch_1"),
    (CIFAR100DataModule, "cifar-100-python", "meta"),
    (STL10DataModule, "stl10_binary", "unlabeled_X.bin"),
])
def test_missing_files_without_download_say_what_to_place_where(tmp_path, no_network, cls, folder, a_file):
    dm = cls(data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetNotAvailableError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / folder) in message and a_file in message
    assert "point data_dir at a folder" in message and "set download=True" in message
    assert no_network == []


def test_offline_download_fails_fast_with_the_message(tmp_path, no_network):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    start = time.monotonic()
    with pytest.raises(DatasetNotAvailableError) as info:
        dm.prepare_data()
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "CIFAR-10" in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "offline" in message and "cifar-10-python.tar.gz" in message
    assert no_network  # the download was attempted (and refused), not skipped


def test_download_error_after_dns_is_reported_and_socket_timeout_restored(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [])
    seen_timeouts = []

    def refuse(*args, **kwargs):
        seen_timeouts.append(socket.getdefaulttimeout())
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    before = socket.getdefaulttimeout()
    dm = STL10DataModule(data_dir=str(tmp_path), download=True, download_timeout=3.0)
    with pytest.raises(DatasetNotAvailableError, match="STL-10.*URLError"):
        dm.setup("fit")
    assert seen_timeouts and seen_timeouts[0] == 3.0
    assert socket.getdefaulttimeout() == before


@pytest.mark.timeout(30)
def test_hanging_dns_does_not_hang_the_download(tmp_path, monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(3)
        raise socket.gaierror("too late")

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=True, download_timeout=0.2)
    start = time.monotonic()
    with pytest.raises(DatasetNotAvailableError, match="could not resolve"):
        dm.prepare_data()
    assert time.monotonic() - start < 2
