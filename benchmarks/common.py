"""What the benchmark scripts share: one bare MoCo training step, a timer, and writing results as JSON.

The scripts run as ``python benchmarks/<name>.py``, which puts this folder on ``sys.path``: they import it as
``common``. A run writes its JSON to a folder of its own, ``outputs/benchmarks/<date>_<time>/`` (or ``--out``);
only ``--record`` replaces the recorded result in ``benchmarks/results/`` that ``benchmarks/RESULTS.md`` cites.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from moco_lightning import MoCo

#: The recorded results, tracked in git and cited by ``benchmarks/RESULTS.md``: written only with ``--record``.
RECORDED = Path(__file__).resolve().parent / "results"


def add_output_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    """Add ``--out PATH`` and ``--record`` to a benchmark's parser; ``name`` is its result file's name."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out", default=None,
                       help=f"result file (default: outputs/benchmarks/<date>_<time>/{name}, a new folder per run)")
    group.add_argument("--record", action="store_true",
                       help=f"update the recorded result benchmarks/results/{name} (tracked in git) instead")


def output_path(args: argparse.Namespace, name: str) -> Path:
    """Where a run writes its result: ``--out``, the recorded file with ``--record``, else a new folder of its own."""
    if args.out:
        return Path(args.out)
    if args.record:
        return RECORDED / name
    return Path("outputs") / "benchmarks" / f"{datetime.now():%Y-%m-%d_%H-%M-%S}" / name


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
