"""Augmentation throughput: images per second per worker (one process, one thread), two views per image.

Measures the MoCo v2 ("aug+") pretraining transform on synthetic RGB PIL images, excluding file decoding:
32 px crops of 32x32 images (CIFAR-like) and 224 px crops of 500x375 images (a typical ImageNet photo).
Prints a table and writes JSON. Not a test.

    python benchmarks/augmentation_throughput.py --images 500 --record   # updates benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch
import torchvision
from common import add_output_arguments, output_path
from PIL import Image

from moco_lightning.transforms import TwoViewTransform, build_view_transforms

CASES = {  # name: (augmentation, crop size, source image (width, height))
    "v2@32px": ("v2", 32, (32, 32)),
    "v2@224px": ("v2", 224, (500, 375)),
}


def measure(augmentation: str, size: int, source: tuple[int, int], images: int, warmup: int) -> dict:
    rng = np.random.default_rng(0)
    pool = [Image.fromarray(rng.integers(0, 256, (source[1], source[0], 3), dtype=np.uint8)) for _ in range(16)]
    pair = TwoViewTransform(*build_view_transforms(augmentation, size))
    for i in range(warmup):
        pair(pool[i % len(pool)])
    start = time.perf_counter()
    for i in range(images):
        views = pair(pool[i % len(pool)])
    elapsed = time.perf_counter() - start
    assert views[0].shape == (3, size, size)
    return {"augmentation": augmentation, "crop_px": size, "source_px": list(source), "images": images,
            "views_per_image": 2, "seconds": round(elapsed, 4), "images_per_s_per_worker": round(images / elapsed, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="images per case (each gives two views)")
    parser.add_argument("--warmup", type=int, default=20)
    add_output_arguments(parser, "augmentation_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one loader worker = one process with one thread
    torch.manual_seed(0)
    results = [{"case": name, **measure(*spec, images=args.images, warmup=args.warmup)}
               for name, spec in CASES.items()]
    print(f"{'case':<10} {'images':>7} {'seconds':>8} {'img/s/worker':>13}")
    for r in results:
        print(f"{r['case']:<10} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s_per_worker']:>13.1f}")
    payload = {"benchmark": "augmentation_throughput", "results": results,
               "environment": {"python": platform.python_version(), "torch": torch.__version__,
                               "torchvision": torchvision.__version__, "pillow": Image.__version__,
                               "machine": platform.machine(), "processor": platform.processor(),
                               "torch_threads": torch.get_num_threads()},
               "command": f"python benchmarks/augmentation_throughput.py --images {args.images}"}
    out = output_path(args, "augmentation_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
