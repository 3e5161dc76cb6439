"""Checkpoint write time: AtomicCheckpointIO (temp file in the folder, fsync, rename) vs Lightning's TorchCheckpointIO.

Writes a checkpoint of the size of the default run's (MoCo ResNet-18: both encoders, SGD momentum buffers, queue;
about 135 MB) with each writer in turn, interleaved, and reports the median seconds per save and the extra memory
each needs beyond the checkpoint itself (Lightning's writer serialises the whole file into memory first).
Prints a table and writes JSON. Not a test.

    python benchmarks/checkpoint_io.py --repeats 5 --record   # updates benchmarks/results/checkpoint_io.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from common import add_output_arguments, output_path
from lightning.pytorch.plugins.io import TorchCheckpointIO

from moco_lightning import MoCo
from moco_lightning.checkpointing import AtomicCheckpointIO


def moco_checkpoint() -> dict:
    model = MoCo("resnet18", dim=128, queue_size=64, mlp=True)
    state = model.state_dict()
    momentum = {i: {"momentum_buffer": p.detach().clone()} for i, p in enumerate(model.encoder_q.parameters())}
    return {"state_dict": state, "optimizer_states": [{"state": momentum, "param_groups": []}], "global_step": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--folder", type=str, default=None, help="where to write (default: a temporary folder)")
    add_output_arguments(parser, "checkpoint_io.json")
    args = parser.parse_args()

    checkpoint = moco_checkpoint()
    writers = {"AtomicCheckpointIO": AtomicCheckpointIO(), "TorchCheckpointIO (Lightning)": TorchCheckpointIO()}
    seconds: dict[str, list[float]] = {name: [] for name in writers}
    peak: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = Path(folder) / "last.ckpt"
        for _ in range(args.repeats):
            for name, writer in writers.items():  # interleaved, so both see the same disk and load
                start = time.perf_counter()
                writer.save_checkpoint(checkpoint, path)
                seconds[name].append(time.perf_counter() - start)
        size_mb = path.stat().st_size / 2**20
        for name, writer in writers.items():
            tracemalloc.start()
            writer.save_checkpoint(checkpoint, path)
            peak[name] = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"checkpoint of {size_mb:.0f} MB, {args.repeats} saves each, load average {load:.2f}")
    print(f"{'writer':<32}{'median s/save':>15}{'min':>8}{'max':>8}{'peak extra MB':>15}")
    for name in writers:
        s = seconds[name]
        print(f"{name:<32}{statistics.median(s):>15.3f}{min(s):>8.3f}{max(s):>8.3f}{peak[name]:>15.0f}")
    result = {"size_mb": size_mb, "repeats": args.repeats, "load_average": load, "machine": platform.platform(),
              "torch": torch.__version__, "seconds": seconds, "peak_extra_mb": peak}
    out = output_path(args, "checkpoint_io.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
