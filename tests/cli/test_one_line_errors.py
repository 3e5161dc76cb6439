"""Mistakes a new user makes end `python train.py` with one line naming the setting, status 2, and no run folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import TINY, run_train

pytestmark = pytest.mark.slow


def _corrupt_folder(root: Path) -> Path:
    for name in ("cats", "dogs"):
        (root / name).mkdir(parents=True)
        (root / name / "a.jpg").write_text("not a jpeg")
        (root / name / "b.png").write_bytes(b"")
    return root


@pytest.mark.timeout(150)
@pytest.mark.parametrize(("case", "expected"), [
    ("corrupt", "none of its 4 image files can be decoded"),
    ("size", "data.image_size=0 must be a positive number of pixels"),
    ("typo", "did you mean data.image_size?"),
])
def test_one_line_status_2_and_no_output_folder(tmp_path, case, expected):
    photos = _corrupt_folder(tmp_path / "photos")
    data = {"corrupt": [f"data.data_dir={photos}"],  # found when the folder is scanned, after the config checks
            "size": [f"data.data_dir={photos}", "data.image_size=0"],
            "typo": [f"data.data_dir={photos}", "data.img_size=64"]}[case]
    tiny = [arg for arg in TINY if not arg.startswith("data.image_size")]
    result = run_train([*tiny, "data=imagefolder", "data.num_workers=0", *data], cwd=tmp_path, timeout=140)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_gpu_accelerator_without_a_gpu_is_one_line_before_anything_is_built(compose_train, capsys, monkeypatch):
    import torch

    from moco_lightning.cli.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as info:
        train(compose_train([*TINY, "trainer.accelerator=gpu"]))
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "trainer.accelerator=gpu but no CUDA GPU is visible" in errors[0]
