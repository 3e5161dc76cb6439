"""AtomicCheckpointIO: a checkpoint file is the old one or the new one, never a half-written one."""

from __future__ import annotations

import errno

import pytest
import torch

from moco_lightning.checkpointing import AtomicCheckpointIO, DiskFullError, atomic_io


def _failing_save(after_bytes: int, error: BaseException):
    """A torch.save that writes ``after_bytes`` bytes of the real file, then fails as a full disk or a kill does."""
    real_save = torch.save

    def save(obj, handle):
        class Truncating:
            written = 0

            def write(self, data):
                if self.written + len(data) > after_bytes:
                    handle.write(bytes(data)[: after_bytes - self.written])
                    raise error
                self.written += len(data)
                return handle.write(data)

            def flush(self):
                handle.flush()

        real_save(obj, Truncating())

    return save


def test_save_then_load_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 3, "w": torch.arange(5.0)}, tmp_path / "a.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a.ckpt")
    assert loaded["step"] == 3 and torch.equal(loaded["w"], torch.arange(5.0))
    assert [p.name for p in tmp_path.iterdir()] == ["a.ckpt"]


def test_a_failure_during_a_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, tmp_path / "last.ckpt")
    before = (tmp_path / "last.ckpt").read_bytes()
    monkeypatch.setattr(atomic_io.torch, "save", _failing_save(500, OSError(errno.EIO, "Input/output error")))
    with pytest.raises(RuntimeError):  # torch.save reports the failed write as a RuntimeError
        io.save_checkpoint({"step": 2, "w": torch.ones(1000)}, tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the partial file is removed


def test_a_full_disk_says_so_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.zeros(1000)}, tmp_path / "last.ckpt")
    before = (tmp_path / "last.ckpt").read_bytes()
    monkeypatch.setattr(atomic_io.torch, "save", _failing_save(500, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError) as info:
        io.save_checkpoint({"step": 2, "w": torch.ones(1000)}, tmp_path / "last.ckpt")
    message = str(info.value)
    assert "the disk is full" in message and "the previous last.ckpt is intact" in message
    assert str(tmp_path) in message and "ckpt_path=auto" in message
    assert (tmp_path / "last.ckpt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_full_disk_on_a_new_file_names_the_newest_intact_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "step00000001.ckpt")
    monkeypatch.setattr(atomic_io.torch, "save", _failing_save(10, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(DiskFullError, match=r"intact \(newest: step00000001.ckpt\)"):
        io.save_checkpoint({"step": 2, "w": torch.ones(100)}, tmp_path / "step00000002.ckpt")
    assert not (tmp_path / "step00000002.ckpt").exists()


def test_partial_files_of_killed_writers_are_removed_at_the_next_save(tmp_path):
    stale = tmp_path / "last.ckpt.partial-99999"
    stale.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    assert not stale.exists() and (tmp_path / "last.ckpt").is_file()


def test_lightning_still_writes_checkpoints_through_the_system_temporary_folder(tmp_path, monkeypatch):
    """When this fails, Lightning writes next to the target: AtomicCheckpointIO's save can go (#21253, PR #21744)."""
    import tempfile

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    system_tmp, run = tmp_path / "node_local_tmp", tmp_path / "run"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    real_mkstemp, made = tempfile.mkstemp, []

    def mkstemp(*args, **kwargs):
        handle, name = real_mkstemp(*args, **kwargs)
        made.append(name)
        return handle, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    TorchCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, run / "last.ckpt")
    assert (run / "last.ckpt").is_file()
    assert any(str(system_tmp) in name for name in made), (
        "Lightning's TorchCheckpointIO no longer writes through the system temporary folder (#21253 fixed, PR "
        "#21744 released?): AtomicCheckpointIO's save may go (moco_lightning/lightning_internals.py)")
