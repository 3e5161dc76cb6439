"""MoCo under Lightning's own DDP launcher with two CPU processes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_fit_script.py")


@pytest.mark.timeout(300)
def test_two_process_ddp_keeps_one_queue_on_every_rank(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 3
    # 3 steps x global batch 8 (4 per rank x 2) = 24 keys written into K=16: pointer 8 on both ranks
    assert r0["ptr"] == r1["ptr"] == 8
    assert torch.equal(r0["queue"], r1["queue"]), "all ranks must hold the same queue"
    assert torch.equal(r0["key_conv"], r1["key_conv"]), "key encoders must stay in sync across ranks"
