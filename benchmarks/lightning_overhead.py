"""The MoCo step in a bare PyTorch loop against the same step through Lightning's Trainer.

Both paths run the same module's math (query and key encoders, InfoNCE, enqueue, SGD, momentum update) on the same
in-memory batches; the Trainer adds its loop, hooks, logging (the module's ``self.log`` calls) and the optimizer
closure. Default: the default run's model (ResNet-18, ImageNet stem, 16 px, batch 64, K 64). Runs alternate
(bare, Trainer, bare, Trainer, ...). Prints a table and writes JSON. Not a test.

    python benchmarks/lightning_overhead.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning as L
import torch
from common import add_output_arguments, bare_step, output_path, write_results
from torch.utils.data import DataLoader, Dataset

from moco_lightning import MoCo
from moco_lightning.optim import build_optimizer


class Batches(Dataset):
    def __init__(self, steps: int, batch: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(2)]
        self.labels = torch.zeros(batch, dtype=torch.long)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        return self.views, self.labels


def make_model(args) -> MoCo:
    torch.manual_seed(0)
    # the digits recipe (conf/recipe/moco/digits_resnet18.yaml) with a constant lr, so both paths do the same updates
    return MoCo(args.backbone, cifar_stem=args.cifar_stem, dim=128, mlp=True, queue_size=args.queue, momentum=0.99,
                temperature=0.4, lr=0.03, weight_decay=1e-4, lr_schedule="constant",
                channels_last=args.channels_last, bn=args.bn)


def bare_loop(args) -> dict[str, float]:
    """The step as a plain PyTorch loop: what the module's hooks compute, called by hand."""
    model = make_model(args).train()
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder_k.")]
    optimizer = build_optimizer(params, "sgd", lr=0.03, momentum=0.9, weight_decay=1e-4)  # what the Trainer gets
    ends = []
    for (im_q, im_k), _ in DataLoader(Batches(args.warmup + args.steps + 1, args.batch, args.size),
                                      batch_size=None):
        bare_step(model, optimizer, im_q, im_k)
        ends.append((time.perf_counter(), time.process_time()))
    return step_times(ends, args.warmup)


def step_times(ends: list[tuple[float, float]], warmup: int) -> dict[str, float]:
    """Median wall and process CPU time between consecutive step ends, after ``warmup`` steps."""
    ends = ends[warmup:]
    return {"wall": statistics.median(b[0] - a[0] for a, b in zip(ends, ends[1:])),
            "cpu": statistics.median(b[1] - a[1] for a, b in zip(ends, ends[1:]))}


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))


def trainer_loop(args) -> dict[str, float]:
    timer = StepTimer()
    steps = args.warmup + args.steps + 1
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        default_root_dir=args.work)
    trainer.fit(make_model(args), DataLoader(Batches(steps, args.batch, args.size), batch_size=None))
    return step_times(timer.ends, args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--bn", default="none", choices=["split", "none"],
                        help="MoCo's BN mode (none: the default run's on one device)")
    parser.add_argument("--work", default="/tmp/lightning_overhead")
    add_output_arguments(parser, "lightning_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs: dict[str, list[dict[str, float]]] = {"bare loop": [], "Trainer": []}
    for repeat in range(args.repeats):
        runs["bare loop"].append(bare_loop(args))
        runs["Trainer"].append(trainer_loop(args))
        bare, lit = runs["bare loop"][-1], runs["Trainer"][-1]
        print(f"repeat {repeat}: bare {bare['wall'] * 1e3:.1f} ms/step ({bare['cpu'] * 1e3:.1f} CPU), Trainer "
              f"{lit['wall'] * 1e3:.1f} ms/step ({lit['cpu'] * 1e3:.1f} CPU), load {os.getloadavg()[0]:.1f}",
              flush=True)
    ratios = {kind: [t[kind] / b[kind] for t, b in zip(runs["Trainer"], runs["bare loop"])] for kind in ("wall", "cpu")}
    print(f"\n{args.backbone}, batch {args.batch}, {args.size} px, {args.threads} threads")
    print(f"{'path':<10} {'wall ms/step per run':<26} {'CPU ms/step per run':<26}")
    for name, times in runs.items():
        wall = ", ".join(f"{1e3 * t['wall']:.1f}" for t in times)
        cpu = ", ".join(f"{1e3 * t['cpu']:.1f}" for t in times)
        print(f"{name:<10} {wall:<26} {cpu:<26}")
    for kind, values in ratios.items():
        print(f"Trainer / bare ({kind}): {', '.join(f'{r:.3f}' for r in values)} "
              f"(median {statistics.median(values):.3f})")

    payload = {"benchmark": "lightning_overhead", "backbone": args.backbone, "cifar_stem": args.cifar_stem,
               "batch": args.batch, "size": args.size, "queue": args.queue, "threads": args.threads,
               "seconds_per_step": runs, "ratios": ratios,
               "ratio_median": {kind: statistics.median(values) for kind, values in ratios.items()},
               "command": f"python benchmarks/lightning_overhead.py --threads {args.threads} "
                          f"--repeats {args.repeats} --steps {args.steps}"}
    write_results(payload, output_path(args, "lightning_overhead.json"))


if __name__ == "__main__":
    main()
