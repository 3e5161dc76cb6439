"""The ImageNet pretraining loader with decoding: images per second per loader worker, exact against draft decoding.

Real JPEG photographs at ImageNet's typical size and quality: random crops of the two photographs scikit-learn ships
(``load_sample_images``: china.jpg and flower.jpg, 640x427), three in four landscape 500x375 and one in four
portrait 375x500, some mirrored, re-encoded at quality 90 (PIL's default 4:2:0 chroma subsampling). They are made
once into a cache folder under the temp dir.

Each case runs the pretraining set of an ``ImageFolderDataModule`` (MoCo v2, two views per image) through a
``DataLoader`` with one worker process (one thread, ``OMP_NUM_THREADS=1``):

* ``batched`` (``data.batch_augmentation=true``, the configs' default): the worker decodes and takes the two random
  resized crops as uint8 tensors; the rest runs on the training device and is not timed here;
* ``per image`` (``data.batch_augmentation=false``): the worker runs the whole recipe.

``decode="exact"`` decodes every image whole with PIL, then crops; ``decode="draft"`` draws the boxes from the header
and decodes at the DCT reduction they allow, and where the batched crops leave as tensors and nothing is reduced,
decodes with libjpeg-turbo into a tensor and crops in torch (``moco_lightning.data.jpeg``). Per worker: images per
wall-clock second of the loader; per core: images per CPU second of the worker process (``time.process_time`` in the
worker), which a busy machine disturbs less. Rounds alternate the paths; the table shows the median of the rounds.
Not a test.

    OMP_NUM_THREADS=1 python benchmarks/jpeg_loader.py                 # JSON to a temp folder
    OMP_NUM_THREADS=1 python benchmarks/jpeg_loader.py --write-results # to benchmarks/results/jpeg_loader.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import write_results
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from moco_lightning.data import ImageFolderDataModule

ROOT = Path(__file__).resolve().parents[1]


def make_photos(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs of about 500x375 (quality 90) cut from scikit-learn's sample photographs, made once."""
    done = folder / "DONE"
    if done.exists() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    sources = [Image.fromarray(image) for image in load_sample_images().images]
    rng = np.random.default_rng(seed)
    for i in range(count):
        source = sources[i % len(sources)]
        out = (500, 375) if rng.random() < 0.75 else (375, 500)
        # the largest box of the output's aspect in the source, shrunk to 60-100 %, at a random place
        fit = min(source.width / out[0], source.height / out[1]) * rng.uniform(0.6, 1.0)
        w, h = round(out[0] * fit), round(out[1] * fit)
        left, top = int(rng.integers(0, source.width - w + 1)), int(rng.integers(0, source.height - h + 1))
        photo = source.resize(out, Image.Resampling.LANCZOS, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            photo = photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        photo.save(folder / f"{i:05d}.jpg", quality=90)
    done.write_text("ok\n")
    return folder


class WorkerClock(Dataset):
    """``dataset[i]`` and the CPU seconds its process has used so far (and the decode's reduction, 0 = none)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.decoder = getattr(dataset.base, "decoder", None)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, float, int]:
        item = self.dataset[index]
        reduction = getattr(self.decoder, "last_reduction", 0)
        return item[0], time.process_time(), reduction


def measure(folder: Path, decode: str, batched: bool, size: int, images: int, batch: int) -> dict[str, float]:
    """One round: images per second of a one-worker loader (wall clock, and per CPU second of the worker)."""
    datamodule = ImageFolderDataModule(str(folder), labels="none", val_fraction=0.0, decode=decode,
                                       batch_augmentation=batched, image_size=size, augmentation="v2")
    datamodule.setup("fit")
    dataset = WorkerClock(datamodule.pretrain_dataset)
    generator = torch.Generator().manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=1, generator=generator,
                        prefetch_factor=4)
    batches = iter(loader)
    _, clock, _ = next(batches)  # warm-up: the worker's start and first batch
    start_wall, start_cpu, seen, reduced = time.perf_counter(), float(clock[-1]), 0, 0
    for _, clock, reduction in batches:
        seen += len(clock)
        reduced += int((reduction > 1).sum())
        if seen >= images:
            break
    wall = time.perf_counter() - start_wall
    cpu = float(clock[-1]) - start_cpu
    del batches
    return {"per_worker": seen / wall, "per_core": seen / cpu, "images": seen, "reduced_share": reduced / seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000, help="photographs to make (cached under the temp dir)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 112], help="output crop sizes")
    parser.add_argument("--batched-images", type=int, default=1500, help="images timed per batched round")
    parser.add_argument("--per-image-images", type=int, default=300, help="images timed per per-image round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=None, help="folder of jpeg_loader.json (default: a temp folder)")
    parser.add_argument("--write-results", action="store_true",
                        help="write benchmarks/results/jpeg_loader.json (the file RESULTS.md quotes)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    folder = make_photos(Path(tempfile.gettempdir()) / f"moco_jpeg_loader_{args.files}", args.files)
    load_start = os.getloadavg()
    print(f"{args.files} photographs in {folder}; load average {load_start[0]:.2f} on {os.cpu_count()} CPUs; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    cases = [(size, batched) for size in args.sizes for batched in (True, False)]
    rounds: dict[str, list[dict[str, float]]] = {}
    for round_index in range(args.rounds):
        for size, batched in cases:
            for decode in ("exact", "draft"):
                images = args.batched_images if batched else args.per_image_images
                result = measure(folder, decode, batched, size, images, args.batch)
                result["loadavg"] = os.getloadavg()[0]
                key = f"{size} px, {'batched' if batched else 'per image'}, {decode}"
                rounds.setdefault(key, []).append(result)
                print(f"round {round_index + 1}: {key}: {result['per_worker']:.1f} images/s per worker, "
                      f"{result['per_core']:.1f} per core, {result['reduced_share']:.0%} reduced, "
                      f"load {result['loadavg']:.2f}", flush=True)

    print("\n| case | decode | per worker (images/s) | per core (images/CPU s) | decoded reduced | "
          "draft / exact (per worker, per core) |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, dict[str, float]] = {}
    for key, results in rounds.items():
        summary[key] = {name: statistics.median(r[name] for r in results)
                        for name in ("per_worker", "per_core", "reduced_share")}
    for key, medians in summary.items():
        case, decode = key.rsplit(", ", 1)
        exact = summary[f"{case}, exact"]
        ratio = (f"{medians['per_worker'] / exact['per_worker']:.2f}x, {medians['per_core'] / exact['per_core']:.2f}x"
                 if decode == "draft" else "")
        print(f"| {case} | {decode} | {medians['per_worker']:.1f} | {medians['per_core']:.1f} | "
              f"{medians['reduced_share']:.0%} | {ratio} |")
    out = (ROOT / "benchmarks/results/jpeg_loader.json" if args.write_results
           else Path(args.out or tempfile.mkdtemp(prefix="jpeg_loader_")) / "jpeg_loader.json")
    write_results({"files": args.files, "folder": str(folder), "rounds": rounds, "median": summary,
                   "loadavg_start": [round(v, 2) for v in load_start],
                   "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}, out)


if __name__ == "__main__":
    main()
