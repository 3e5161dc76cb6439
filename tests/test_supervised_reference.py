"""benchmarks/supervised_reference.py (the supervised upper reference) at a budget of about a second."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "supervised_reference.py"


@pytest.mark.timeout(300)
def test_the_supervised_reference_trains_for_its_budget_and_reports_both_accuracies(tmp_path):
    out = tmp_path / "reference.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(SCRIPT), "data.image_size=8", "data.batch_size=32", "--minutes",
                           "0.02", "--out", str(out)], capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "classifier top-1" in done.stdout and "kNN top-1" in done.stdout
    result = json.loads(out.read_text())
    assert (result["dataset"], result["backbone"], result["image_size"], result["batch_size"]) == (
        "digits", "resnet18", 8, 32)
    assert result["cifar_stem"] is False  # the digits recipe's stem, as MoCo would build it
    assert result["steps"] >= 1 and result["train_seconds"] >= 0.02 * 60  # stops after the step crossing the budget
    assert 0.0 <= result["classifier_top1"] <= 1.0 and 0.0 <= result["knn_top1"] <= 1.0
    assert result["lr"] == pytest.approx(0.1 * 32 / 256)



@pytest.mark.timeout(300)
def test_a_run_writes_a_folder_of_its_own_and_leaves_the_recorded_results_alone(tmp_path):
    recorded = sorted((ROOT / "benchmarks" / "results").iterdir())
    before = {path: path.stat().st_mtime_ns for path in recorded}
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, str(SCRIPT), "data.image_size=8", "data.batch_size=32", "--minutes", "0.01"],
                          capture_output=True, text=True, timeout=280, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [written] = (tmp_path / "outputs" / "benchmarks").glob("*/supervised_reference_digits.json")
    assert f"wrote {written.relative_to(tmp_path)}" in done.stdout
    assert json.loads(written.read_text())["dataset"] == "digits"
    assert {path: path.stat().st_mtime_ns for path in sorted((ROOT / "benchmarks" / "results").iterdir())} == before


def test_record_and_out_are_one_choice_or_the_other():
    spec = importlib.util.spec_from_file_location("benchmarks_common", SCRIPT.parent / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    parser = argparse.ArgumentParser()
    common.add_output_arguments(parser, "x.json")
    assert common.output_path(parser.parse_args(["--record"]), "x.json") == ROOT / "benchmarks" / "results" / "x.json"
    assert common.output_path(parser.parse_args(["--out", "y.json"]), "x.json") == Path("y.json")
    assert common.output_path(parser.parse_args([]), "x.json").parts[:2] == ("outputs", "benchmarks")
    with pytest.raises(SystemExit):
        parser.parse_args(["--record", "--out", "y.json"])
