"""``python eval_linear.py linear_protocol=features``: the CPU-budget probe from the command line, on the digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.config_checks import ConfigError
from moco_lightning.cli.eval_linear_features import evaluate_features

from .test_eval_entry_points import _checkpoint

REPO = Path(__file__).resolve().parents[2]
FAST = ["data.image_size=8", "l2_grid=[1e-3,1e-1]", "max_iter=60"]


def _eval_linear(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(REPO / "eval_linear.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("eval_linear", overrides=["linear_protocol=features", *overrides])


def test_the_features_protocol_runs_from_the_command_line_and_writes_results(tmp_path):
    ckpt = _checkpoint(tmp_path / "tiny.ckpt")
    out = tmp_path / "run"
    done = _eval_linear(["linear_protocol=features", f"checkpoint={ckpt}", *FAST, f"hydra.run.dir={out}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "linear probe (L-BFGS on frozen resnet18 features, 512 dims" in done.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"] == "features" and result["checkpoint"] == str(ckpt)
    assert (result["feature_dim"], result["num_train"], result["num_eval"]) == (512, 1437, 360)
    assert 0.0 <= result["linear_top1"] <= result["linear_top5"] <= 1.0
    assert set(result["holdout"]) == {"0.001", "0.1"} and result["l2"] in (1e-3, 1e-1)


def test_the_probe_trains_on_the_labelled_subset_only(tmp_path):
    result = evaluate_features(_compose(["checkpoint=pixels", *FAST, "label_fraction=0.1",
                                         f"paths.output_dir={tmp_path}"]))
    assert result["labelled_images"] == 142 and (tmp_path / "labelled_indices.txt").is_file()
    assert result["num_train"] == 142 and result["num_eval"] == 360  # the validation images stay whole


def test_raw_pixels_go_through_the_same_probe(tmp_path):
    result = evaluate_features(_compose(["checkpoint=pixels", *FAST, f"paths.output_dir={tmp_path}"]))
    assert result["checkpoint"] == "pixels" and result["backbone"] is None
    assert result["feature_dim"] == 3 * 8 * 8 and result["num_eval"] == 360
    assert result["linear_top1"] > 0.9  # digits are nearly linearly separable in pixels (chance: 0.1)


@pytest.mark.parametrize(("override", "message"), [("dtype=float16", "dtype=float16 is not one of"),
                                                    ("l2_grid=[]", "l2_grid=.* non-empty"),
                                                    ("holdout_fraction=1.5", "holdout_fraction=1.5 must be in"),
                                                    ("patience=0", "patience=0 must be a positive integer")])
def test_bad_settings_fail_in_one_line_before_any_data_is_read(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        evaluate_features(_compose(["checkpoint=pixels", override, "data.image_size=0"]))  # the data would fail too


def test_pixels_are_refused_by_the_official_protocols(capsys):
    from moco_lightning.cli.eval_linear import _hydra_main

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("eval_linear", overrides=["checkpoint=pixels"])
    with pytest.raises(SystemExit) as exit_info:
        _hydra_main.__wrapped__(cfg)  # the function under @hydra.main: the official protocol's path
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "error: checkpoint=pixels (no encoder) works only with linear_protocol=features")
