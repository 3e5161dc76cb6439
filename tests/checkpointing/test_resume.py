"""Choosing and checking the checkpoint to resume from: ckpt_path=auto, unusable files, models that do not fit."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from checkpointing_helpers import tiny_moco, training_checkpoint

from moco_lightning.checkpointing import (
    ResumeError,
    check_checkpoint_matches,
    find_resume_checkpoint,
    read_training_checkpoint,
)


def _fake(path, step: int):
    """A small file with the keys of a training checkpoint, dated ``step`` seconds after the epoch."""
    torch.save({"state_dict": {"w": torch.full((3,), float(step))}, "optimizer_states": [], "loops": {},
                "global_step": step, "epoch": 0}, path)
    os.utime(path, (step, step))
    return path


def test_a_folder_is_refused_with_the_file_to_pass_instead(tmp_path):
    with pytest.raises(ResumeError, match="is a folder, not a checkpoint file.*last.ckpt.*ckpt_path=auto"):
        read_training_checkpoint(tmp_path)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ResumeError, match="notes.ckpt is not a readable checkpoint"):
        read_training_checkpoint(tmp_path / "notes.ckpt")


def test_an_exported_backbone_is_refused_as_not_a_training_checkpoint(tmp_path):
    torch.save({"conv1.weight": torch.zeros(2)}, tmp_path / "backbone.pth")
    with pytest.raises(ResumeError, match="not a training checkpoint: it has no state_dict, optimizer_states"):
        read_training_checkpoint(tmp_path / "backbone.pth")


def test_a_truncated_checkpoint_is_refused(tmp_path):
    path = _fake(tmp_path / "step.ckpt", 1)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ResumeError, match="truncated or corrupt"):
        read_training_checkpoint(path)


def test_a_checkpoint_with_damaged_data_fails_its_crc(tmp_path):
    path = tmp_path / "step.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "optimizer_states": [], "loops": {}, "global_step": 1,
                "epoch": 0}, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor bytes: torch.load alone would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match="corrupt: its entry .* fails the CRC check"):
        read_training_checkpoint(path)


def test_auto_picks_the_newest_checkpoint_of_the_folders(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    _fake(tmp_path / "checkpoints" / "last.ckpt", 10)
    _fake(tmp_path / "checkpoints" / "step00000012.ckpt", 12)
    _fake(tmp_path / "hpc_ckpt_1.ckpt", 11)  # where Lightning's SLURM requeue saves
    path, checkpoint = find_resume_checkpoint([tmp_path / "checkpoints", tmp_path])
    assert path.name == "step00000012.ckpt" and checkpoint["global_step"] == 12


def test_auto_skips_a_corrupt_newest_checkpoint_with_a_warning_naming_it(tmp_path, caplog):
    _fake(tmp_path / "last.ckpt", 10)
    newest = _fake(tmp_path / "step00000012.ckpt", 12)
    newest.write_bytes(newest.read_bytes()[:100])
    os.utime(newest, (12, 12))
    with caplog.at_level(logging.WARNING):
        path, checkpoint = find_resume_checkpoint([tmp_path])
    assert path.name == "last.ckpt" and checkpoint["global_step"] == 10
    assert any("skipping" in r.message and "step00000012.ckpt" in r.message for r in caplog.records)


def test_auto_finds_nothing_in_an_empty_or_missing_folder(tmp_path):
    assert find_resume_checkpoint([tmp_path, tmp_path / "missing"]) is None


def test_a_checkpoint_of_another_queue_size_names_both_shapes(tmp_path):
    checkpoint = torch.load(training_checkpoint(tiny_moco(queue_size=32), tmp_path / "k32.ckpt"), weights_only=True)
    with pytest.raises(ResumeError) as info:
        check_checkpoint_matches(checkpoint, tiny_moco(queue_size=16), "k32.ckpt")
    message = str(info.value)
    assert "the queue (queue_size, dim) is (32, 8) in the checkpoint but (16, 8) in this run" in message
    assert "model.queue_size=32 there vs 16 here" in message and "\n" not in message


def test_a_checkpoint_of_another_embedding_width_names_both_shapes(tmp_path):
    checkpoint = torch.load(training_checkpoint(tiny_moco(dim=8), tmp_path / "d8.ckpt"), weights_only=True)
    with pytest.raises(ResumeError, match=r"model.dim=8 there vs 16 here.*\(16, 8\) in the checkpoint but \(16, 16\)"):
        check_checkpoint_matches(checkpoint, tiny_moco(dim=16))


def test_a_checkpoint_of_the_same_model_passes(tmp_path):
    model = tiny_moco()
    checkpoint = torch.load(training_checkpoint(model, tmp_path / "same.ckpt"), weights_only=True)
    check_checkpoint_matches(checkpoint, tiny_moco())
