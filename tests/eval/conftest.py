"""Fixtures of the evaluation tests (helpers live in eval_helpers.py, importable by the test modules)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from eval_helpers import BlobsDataModule, make_blobs, save_checkpoint, tiny_moco

from moco_lightning import MoCo


@pytest.fixture
def blobs() -> BlobsDataModule:
    return BlobsDataModule()


@pytest.fixture(scope="session")
def moco_checkpoint(tmp_path_factory) -> tuple[MoCo, Path]:
    """A tiny MoCo with BN statistics moved off their defaults (so copies are checked for real), saved."""
    torch.manual_seed(0)
    model = tiny_moco()
    model.train()
    with torch.no_grad():
        model.embed(make_blobs(16, seed=3)[0])  # updates running_mean / running_var of the query backbone
    model.eval()
    return model, save_checkpoint(model, tmp_path_factory.mktemp("moco") / "moco.ckpt")
