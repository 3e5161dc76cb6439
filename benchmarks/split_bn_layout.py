"""The MoCo step with split BN in both layouts: NCHW, and channels-last before and after split BN kept NHWC.

The bare step of benchmarks/common.py (query and key encoders, InfoNCE, enqueue, SGD, momentum update) of the CIFAR
demo's model (ResNet-18, CIFAR stem, 32 px, split BN in 8 groups, batch 64) on in-memory batches, three variants
alternating in one process:

* ``contiguous``: encoders and batches NCHW;
* ``channels_last, NCHW copy (before)``: NHWC, split BN through the grouped NCHW view, as before this change (every
  BN layer copies its input to NCHW and the next convolution copies it back);
* ``channels_last, kept NHWC (after)``: NHWC, split BN's channels-last path (no layout copy).

Prints the median wall and CPU time per step and writes JSON. Not a test.

    OMP_NUM_THREADS=1 python benchmarks/split_bn_layout.py --threads 1 --record
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from common import add_output_arguments, bare_step, output_path, write_results

import moco_lightning.bn as bn_module
from moco_lightning import MoCo
from moco_lightning.optim import build_optimizer

NAME = "split_bn_layout.json"


def make(channels_last: bool) -> tuple[MoCo, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MoCo("resnet18", cifar_stem=True, dim=128, mlp=True, queue_size=128, momentum=0.99, temperature=0.2,
                 channels_last=channels_last, bn="split", bn_splits=8)
    model.configure_bn(1)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder_k.")]
    return model, build_optimizer(params, "sgd", lr=0.03, momentum=0.9, weight_decay=1e-4)


@contextmanager
def nchw_split_bn(on: bool) -> Iterator[None]:
    """With ``on``, split BN takes its NCHW path for channels-last inputs too (the code before the NHWC path)."""
    original = bn_module._is_channels_last
    if on:
        bn_module._is_channels_last = lambda x: False
    try:
        yield
    finally:
        bn_module._is_channels_last = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    add_output_arguments(parser, NAME)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(args.batch, 3, 32, 32, generator=g) for _ in range(2)]
    variants = {"contiguous": (make(False), False), "channels_last, NCHW copy (before)": (make(True), True),
                "channels_last, kept NHWC (after)": (make(True), False)}
    for (model, optimizer), before in variants.values():
        with nchw_split_bn(before):
            bare_step(model, optimizer, *views)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for name, ((model, optimizer), before) in variants.items():
            with nchw_split_bn(before):
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(args.steps):
                    bare_step(model, optimizer, *views)
                times[name]["wall"].append((time.perf_counter() - wall) / args.steps)
                times[name]["cpu"].append((time.process_time() - cpu) / args.steps)
        load.append(os.getloadavg()[0])
    base = statistics.median(times["contiguous"]["wall"])
    print("| variant | ms per step (median wall) | CPU ms | / contiguous |")
    print("|---|---|---|---|")
    for name, t in times.items():
        wall, cpu = statistics.median(t["wall"]), statistics.median(t["cpu"])
        print(f"| {name} | {wall * 1e3:.0f} | {cpu * 1e3:.0f} | {wall / base:.3f} |")
    print(f"load average (1 min) during the run: {min(load):.1f}-{max(load):.1f}")
    payload = {"benchmark": "split_bn_layout", "threads": args.threads, "batch": args.batch,
               "seconds_per_step": times, "loadavg_1min": load,
               "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python "
                          f"benchmarks/split_bn_layout.py --threads {args.threads} --repeats {args.repeats} "
                          f"--steps {args.steps}"}
    write_results(payload, output_path(args, NAME))


if __name__ == "__main__":
    main()
