"""What the benchmark scripts share: one bare MoCo training step, a timer, and writing results as JSON.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``: they import it as
``common``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moco_lightning import MoCo


def bare_step(model: MoCo, optimizer: torch.optim.Optimizer, im_q: torch.Tensor, im_k: torch.Tensor) -> None:
    """One MoCo training step by hand, as Lightning runs it: step, backward, optimizer step, momentum update."""
    out = model.step(im_q, im_k)
    optimizer.zero_grad()
    out["loss"].backward()
    optimizer.step()
    model.momentum_update()


def time_call(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(payload: dict[str, Any], out: str | Path) -> None:
    """Write ``payload`` as indented JSON to ``out``, with the load average and the software it ran on."""
    payload = {**payload, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
               "environment": {"python": platform.python_version(), "torch": torch.__version__,
                               "machine": platform.machine(), "cpus": os.cpu_count()}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
