"""A MoCo v2 step with the encoders and batches channels-last (``model.channels_last``) against the default layout.

The same bare step as benchmarks/lightning_overhead.py (query and key encoders, InfoNCE, enqueue, SGD, momentum
update) on in-memory batches, both layouts alternating in one process. Two cases: the default run's model
(ResNet-18, ImageNet stem, 16 px) and the CIFAR demo's (CIFAR stem, 32 px), batch 64. Prints wall and CPU time
per step and writes JSON. Not a test.

    python benchmarks/memory_format.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from common import add_output_arguments, bare_step, output_path, write_results

from moco_lightning import MoCo
from moco_lightning.optim import build_optimizer

# name: (CIFAR stem, image size, timed steps, BN mode of that recipe on one device)
CASES = {"ImageNet stem, 16 px, plain BN (default run)": (False, 16, 8, "none"),
         "CIFAR stem, 32 px, split BN (CIFAR demo)": (True, 32, 2, "split")}


def make(cifar_stem: bool, channels_last: bool, bn: str) -> tuple[MoCo, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MoCo("resnet18", cifar_stem=cifar_stem, dim=128, mlp=True, queue_size=64, momentum=0.99,
                 temperature=0.4, channels_last=channels_last, bn=bn)
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder_k.")]
    return model, build_optimizer(params, "sgd", lr=0.03, momentum=0.9, weight_decay=1e-4)  # as the Trainer path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    add_output_arguments(parser, "memory_format.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for case, (cifar_stem, size, steps, bn) in CASES.items():
        g = torch.Generator().manual_seed(0)
        views = [torch.randn(64, 3, size, size, generator=g) for _ in range(2)]
        variants = {"contiguous": make(cifar_stem, False, bn), "channels_last": make(cifar_stem, True, bn)}
        for model, optimizer in variants.values():
            bare_step(model, optimizer, *views)
        times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
        for _ in range(args.repeats):
            for name, (model, optimizer) in variants.items():
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    bare_step(model, optimizer, *views)
                times[name]["wall"].append((time.perf_counter() - wall) / steps)
                times[name]["cpu"].append((time.process_time() - cpu) / steps)
        ratio = {kind: statistics.median(times["channels_last"][kind]) / statistics.median(times["contiguous"][kind])
                 for kind in ("wall", "cpu")}
        results[case] = {"seconds_per_step": times, "channels_last_over_contiguous": ratio}
        print(f"{case}: contiguous {statistics.median(times['contiguous']['wall']) * 1e3:.0f} ms/step, "
              f"channels-last {statistics.median(times['channels_last']['wall']) * 1e3:.0f} ms/step; "
              f"channels-last / contiguous {ratio['wall']:.3f} wall, {ratio['cpu']:.3f} CPU; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    payload = {"benchmark": "memory_format", "threads": args.threads, "results": results,
               "command": f"python benchmarks/memory_format.py --threads {args.threads} --repeats {args.repeats}"}
    write_results(payload, output_path(args, "memory_format.json"))


if __name__ == "__main__":
    main()
