"""benchmarks/gpu_check.sh, the one prepared GPU check: its CPU dry form runs every part end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.mark.timeout(120)
def test_the_dry_run_measures_every_part_and_runs_train_py_under_ddp(tmp_path):
    # PYTHON: this interpreter, whether or not its environment is activated (CI runs .venv/bin/python -m pytest)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", DRY="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=110, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] is True and result["settings"]["backbone"] == "resnet18"
    steps = {(r["step"], r["bn"], r["compiled"]): r for r in result["steps"]}
    assert set(steps) == {("moco_v2", "split", False), ("moco_v2", "none", False), ("supervised", "plain", False),
                          ("moco_v2", "split", True), ("moco_v2", "none", True), ("supervised", "plain", True)}
    measured = [r for r in steps.values() if not r.get("skipped")]
    assert all(r["step_images_per_s"] > 0 and r["syncs"] == {} for r in measured)  # no CUDA: nothing syncs
    assert steps[("moco_v2", "split", False)]["augment_images_per_s"] > 0
    assert result["supervised_over_moco"]["eager, split BN"] > 0
    run = result["train_run"]
    assert run["returncode"] == 0 and run["steps"] >= 1 and "last.ckpt" in run["checkpoints"]
    assert run["knn_top1"] is not None and run["backend"] == "gloo"  # DDP with one process, on the CPU
    assert {"trainer=ddp", "trainer.devices=1", "model.bn=split"} <= set(run["overrides"])
    assert not (BENCHMARKS / "results" / "gpu_check.json").exists() or "dry_run\": false" in (
        BENCHMARKS / "results" / "gpu_check.json").read_text()  # a dry run never writes the real results


def test_host_syncs_are_counted_by_the_line_of_our_code_that_caused_them():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCHMARKS))

    def augmentation_like() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    with gpu_check.record_syncs(torch.device("cpu")) as syncs:
        augmentation_like()
        augmentation_like()
        warnings.warn("something else", UserWarning, stacklevel=1)
    assert len(syncs) == 1 and sum(syncs.values()) == 2
    (where,) = syncs
    line = augmentation_like.__code__.co_firstlineno + 1
    assert where.startswith(f"tests/test_gpu_check.py:{line}")
