"""Faults and bad input end `python train.py` with one line `error: ...` and lose nothing (in-process train())."""

from __future__ import annotations

import errno

import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from moco_lightning.checkpointing import atomic_io
from moco_lightning.cli.train import train

#: One step per epoch on 8 px digits, no kNN table: the cheapest real run of the CLI.
TINY = ["data.image_size=8", "data.batch_size=16", "model.queue_size=48", "trainer.max_epochs=2",
        "trainer.limit_train_batches=1", "trainer.accelerator=cpu", "trainer.enable_model_summary=false",
        "callbacks.progress_bar.refresh_rate=0", "knn_report=false"]


def _error_line(capsys, cfg, status: int) -> str:
    with pytest.raises(SystemExit) as info:
        train(cfg)
    assert info.value.code == status
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


def test_an_empty_dataset_folder(compose_train, capsys, tmp_path):
    (tmp_path / "images").mkdir()
    cfg = compose_train(["data=imagefolder", f"data.data_dir={tmp_path / 'images'}", "data.num_workers=0", *TINY])
    line = _error_line(capsys, cfg, 2)
    assert "data.data_dir=" in line and "is an empty folder" in line


def test_fewer_images_than_one_batch(compose_train, capsys, tmp_path):
    folder = tmp_path / "images" / "digit"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(folder / f"{i}.png")
    cfg = compose_train(["data=imagefolder", f"data.data_dir={tmp_path / 'images'}", "data.val_fraction=0",
                         "data.num_workers=0", "~callbacks.knn", *TINY, "data.batch_size=4", "model.queue_size=8",
                         "model.bn=none"])  # split BN would refuse a batch of 4 first
    line = _error_line(capsys, cfg, 2)
    assert "has 3 images" in line and "fewer than data.batch_size=4" in line


def test_a_checkpoint_path_that_is_not_a_checkpoint(compose_train, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    line = _error_line(capsys, compose_train([*TINY, f"ckpt_path={tmp_path / 'notes.txt'}"]), 2)
    assert "notes.txt is not a readable checkpoint" in line


def test_a_checkpoint_of_another_queue_size_is_refused_before_training(compose_train, capsys, tmp_path):
    other = instantiate(compose_train([*TINY, "model.queue_size=32"]).model, _convert_="all")
    torch.save({"state_dict": other.state_dict(), "optimizer_states": [], "loops": {}, "global_step": 5, "epoch": 0,
                "hyper_parameters": dict(other.hparams)}, tmp_path / "k32.ckpt")
    line = _error_line(capsys, compose_train([*TINY, f"ckpt_path={tmp_path / 'k32.ckpt'}"]), 2)
    assert "(32, 128) in the checkpoint but (48, 128) in this run" in line
    assert "model.queue_size=32 there vs 48 here" in line
    assert not (tmp_path / "checkpoints").exists()  # nothing ran


def test_a_full_disk_when_saving_says_so_and_keeps_the_previous_checkpoint(compose_train, capsys, tmp_path,
                                                                            monkeypatch):
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):  # the disk fills up while the epoch-1 checkpoints are written
        if ".partial-" in str(getattr(handle, "name", "")) and obj.get("global_step", 0) >= 2:
            handle.write(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(atomic_io.torch, "save", save)
    line = _error_line(capsys, compose_train([*TINY, "~callbacks.knn", "~callbacks.model_checkpoint"]), 1)
    assert "the disk is full" in line and "nothing was overwritten" in line and "intact" in line
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1  # the epoch-0 checkpoint, whole
    assert not list((tmp_path / "checkpoints").glob("*.partial-*"))
