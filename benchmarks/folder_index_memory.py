"""Memory that a forked loader worker copies out of an ImageNet-sized image-folder index (issue 27, item 8).

A synthetic index of 1.28 M files in 1,000 ImageNet-like class folders (``<root>/n01440764/n01440764_10026.JPEG``;
no files on disk) is held two ways:

* ``list of tuples``: the dataset before, ``samples = [(path, label)]`` and ``targets = [label]`` (reproduced here);
* ``FileIndex arrays``: the dataset now, :class:`~moco_lightning.data.folder.ImageFolderDataset` built from the same
  pairs (its :class:`~moco_lightning.data.folder.FileIndex`: a byte buffer, offsets and labels).

For each, a ``DataLoader`` with one forked worker reads every entry's path and label the way the dataset's
``__getitem__`` does, and returns the worker's ``/proc/self/smaps_rollup`` before and after. The growth of its
``Private_Dirty`` is the memory copied on write into that worker, which every worker of every rank pays (80
workers for 8 processes x 10 workers). Linux only. Not a test.

    python benchmarks/folder_index_memory.py            # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from common import add_output_arguments, output_path, write_results
from torch.utils.data import DataLoader, Dataset

from moco_lightning.data.folder import FileIndex, ImageFolderDataset

MB = 2**20


def synthetic_samples(n: int, classes: int, root: str, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` ImageNet-like ``(path, label)`` pairs, ``n / classes`` per class, as the folder scan lists them."""
    rng = np.random.default_rng(seed)
    wnids = sorted(f"n{w:08d}" for w in rng.choice(10**8, size=classes, replace=False))
    per_class = -(-n // classes)
    samples = []
    for label, wnid in enumerate(wnids):
        for image in sorted(rng.choice(10**5, size=per_class, replace=False))[: n - len(samples)]:
            samples.append((f"{root}/{wnid}/{wnid}_{image}.JPEG", label))
    return samples


class OldIndex:
    """The dataset's index before: a list of ``(path, label)`` tuples (and the labels again in ``targets``)."""

    def __init__(self, samples: list[tuple[str, int]]) -> None:
        self.samples = samples
        self.targets = [label for _, label in samples]

    def entry(self, i: int) -> tuple[str, int]:
        path, label = self.samples[i]  # what the old __getitem__ did before decoding
        return path, label


def smaps_rollup() -> dict[str, int]:
    """This process's memory counters from ``/proc/self/smaps_rollup``, in bytes."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return fields


class TouchEveryEntry(Dataset):
    """One item, computed in the loader worker: read every entry, with the worker's memory before and after."""

    def __init__(self, entry: Callable[[int], tuple[str, int]], n: int) -> None:
        self.entry, self.n = entry, n

    def __len__(self) -> int:
        return 1

    def __getitem__(self, _: int) -> dict:
        before = smaps_rollup()
        start = time.perf_counter()
        checksum = 0
        for i in range(self.n):
            path, label = self.entry(i)
            checksum += len(path) + label
        seconds = time.perf_counter() - start
        after = smaps_rollup()
        return {"before": before, "after": after, "seconds": seconds, "checksum": checksum}


def same(item: dict) -> dict:
    return item


def in_a_worker(entry: Callable[[int], tuple[str, int]], n: int) -> dict:
    """Fork one loader worker, make it read every entry, and return what it measured."""
    gc.collect()  # as in a run, the parent has collected (and untracked the tuples) long before the workers start
    loader = DataLoader(TouchEveryEntry(entry, n), batch_size=None, num_workers=1, collate_fn=same,
                        multiprocessing_context="fork")
    return next(iter(loader))


def row(form: str, parent_bytes: int, measured: dict, workers: int) -> dict:
    growth = {key: measured["after"][key] - measured["before"][key] for key in ("Private_Dirty", "Pss", "Rss")}
    return {"form": form, "index_in_parent_mb": round(parent_bytes / MB, 1),
            "worker_private_dirty_growth_mb": round(growth["Private_Dirty"] / MB, 1),
            "worker_pss_growth_mb": round(growth["Pss"] / MB, 1),
            "worker_rss_growth_mb": round(growth["Rss"] / MB, 1),
            "worker_private_dirty_after_mb": round(measured["after"]["Private_Dirty"] / MB, 1),
            f"copied_over_{workers}_workers_gb": round(workers * growth["Private_Dirty"] / 2**30, 2),
            "seconds_to_read_all": round(measured["seconds"], 2), "checksum": measured["checksum"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1_281_167, help="entries of the index (ImageNet train)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--root", default="/datasets/imagenet/train", help="the folder the paths start with")
    parser.add_argument("--workers", type=int, default=80, help="workers for the total (8 processes x 10)")
    add_output_arguments(parser, "folder_index_memory.json")
    args = parser.parse_args()

    tracemalloc.start()
    old = OldIndex(synthetic_samples(args.images, args.classes, args.root))
    old_bytes = tracemalloc.get_traced_memory()[0]  # the tuples, strings and both lists
    tracemalloc.stop()
    rows = [row("list of tuples (before)", old_bytes, in_a_worker(old.entry, args.images), args.workers)]

    new = ImageFolderDataset(old.samples)  # the real dataset and its FileIndex, from the same pairs
    assert list(new.index) == old.samples
    del old
    index: FileIndex = new.index
    new_bytes = index.names.nbytes + index.offsets.nbytes + index.labels.nbytes
    rows.append(row("FileIndex arrays (now)", new_bytes, in_a_worker(index.__getitem__, args.images), args.workers))
    assert rows[0]["checksum"] == rows[1]["checksum"]  # both workers read the same paths and labels

    total = f"copied_over_{args.workers}_workers_gb"
    print(f"{args.images:,} entries, {args.classes} classes, e.g. {index.path(0)}")
    print(f"{'form':26} {'index in parent':>16} {'worker Private_Dirty +':>23} {'Pss +':>9} "
          f"{f'x {args.workers} workers':>14} {'read all':>9}")
    for r in rows:
        print(f"{r['form']:26} {r['index_in_parent_mb']:>13.1f} MB {r['worker_private_dirty_growth_mb']:>20.1f} MB "
              f"{r['worker_pss_growth_mb']:>6.1f} MB {r[total]:>11.2f} GB {r['seconds_to_read_all']:>7.2f} s")
    write_results({"images": args.images, "classes": args.classes, "root": args.root, "workers": args.workers,
                   "rows": rows}, output_path(args, "folder_index_memory.json"))


if __name__ == "__main__":
    main()
