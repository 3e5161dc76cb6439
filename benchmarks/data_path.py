"""The data path: per-image augmentation in a loader worker against the batched augmentation, at 32 and 224 px.

MoCo v2 ("aug+"), two views per image, synthetic RGB images (no file decoding):

* per image (``data.batch_augmentation=false``): the whole recipe in a loader worker (one process, one thread);
* batched (``data.batch_augmentation=true``): what is left to a loader worker (32 px: the image to a uint8 tensor;
  224 px: the two random resized crops of a 500x375 photo, to uint8 tensors), and the rest on whole batches on
  the training device, here the CPU with ``--threads`` threads (``benchmarks/gpu_step.py`` measures it on a GPU).

Prints images per second and writes JSON. Not a test.

    python benchmarks/data_path.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from common import add_output_arguments, output_path, write_results
from PIL import Image

from moco_lightning.data.batch_augment import build_batch_augmentation
from moco_lightning.transforms import CIFAR10_MEAN, CIFAR10_STD, TwoViewTransform, build_view_transforms

CASES = {"32 px (CIFAR, from 32x32)": (32, (32, 32), True), "224 px (ImageNet, from 500x375)": (224, (500, 375), False)}


def per_second(fn, items: int, warmup: int = 2, min_seconds: float = 2.0) -> float:
    """Items per second of ``fn`` (called repeatedly for at least ``min_seconds``)."""
    for _ in range(warmup):
        fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return calls * items / elapsed


def measure(size: int, source: tuple[int, int], crop_on_device: bool, batch: int, threads: int) -> dict:
    rng = np.random.default_rng(0)
    pool = [Image.fromarray(rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)) for _ in range(8)]

    torch.set_num_threads(1)  # a loader worker: one process, one thread
    per_image = TwoViewTransform(*build_view_transforms("v2", size, CIFAR10_MEAN, CIFAR10_STD))
    batched = build_batch_augmentation("v2", size, CIFAR10_MEAN, CIFAR10_STD, crop_on_device=crop_on_device)
    loader_part = batched.loader_transform
    counter = iter(range(10**9))
    per_image_rate = per_second(lambda: per_image(pool[next(counter) % 8]), 1)
    loader_rate = per_second(lambda: loader_part(pool[next(counter) % 8]), 1)

    torch.set_num_threads(threads)  # the training process
    one = loader_part(pool[0])
    if crop_on_device:
        images = torch.stack([one] * batch)
    else:
        images = [torch.stack([one[0]] * batch), torch.stack([one[1]] * batch)]
    generator = torch.Generator().manual_seed(0)
    device_rate = per_second(lambda: batched(images, generator), batch)
    return {"size": size, "source": list(source), "per_image_per_worker": round(per_image_rate, 1),
            "batched_loader_part_per_worker": round(loader_rate, 1),
            "batched_device_part_cpu": round(device_rate, 1), "device_batch": batch, "device_threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of the batched part (the training process)")
    parser.add_argument("--batch", type=int, default=64)
    add_output_arguments(parser, "data_path.json")
    args = parser.parse_args()
    results = {}
    for name, (size, source, crop_on_device) in CASES.items():
        results[name] = measure(size, source, crop_on_device, args.batch, args.threads)
        print(f"{name}: {results[name]}  load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{'case':<32} {'per image, per worker':>22} {'batched: loader part/worker':>28} "
          f"{'batched: device part (CPU)':>27}")
    for name, r in results.items():
        print(f"{name:<32} {r['per_image_per_worker']:>22.1f} {r['batched_loader_part_per_worker']:>28.1f} "
              f"{r['batched_device_part_cpu']:>27.1f}")
    print("(images per second, two views each)")
    payload = {"benchmark": "data_path", "augmentation": "v2", "results": results,
               "command": f"python benchmarks/data_path.py --threads {args.threads} --batch {args.batch}"}
    write_results(payload, output_path(args, "data_path.json"))


if __name__ == "__main__":
    main()
