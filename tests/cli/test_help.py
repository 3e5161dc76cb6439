"""`python train.py --help` prints the project's help: the groups, the keys that matter, the example commands."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import TRAIN_PY


@pytest.mark.timeout(120)
def test_help_names_groups_keys_and_examples(tmp_path):
    result = subprocess.run([sys.executable, str(TRAIN_PY), "--help"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=110)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert text.startswith("moco-train (python train.py)")
    assert "data: cifar10, cifar100, digits, fashion_mnist, imagefolder" in text
    assert "experiment:" in text and "my_images" in text
    keys = text.split("== The keys that matter most ==")[1].split("== Examples ==")[0].strip().splitlines()
    assert len(keys) == 10 and keys[0].startswith("data.data_dir=")
    assert "python train.py experiment=my_images data.data_dir=" in text
    assert len(text.splitlines()) < 60  # not the 200 lines of the composed config
    assert not (tmp_path / "outputs").exists()
