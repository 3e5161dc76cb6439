"""MoCo v2 step against a supervised step of the same encoder, batch and image size, through the real Trainer.

A supervised step is one forward and one backward pass of the encoder; a MoCo step adds the key encoder's forward
pass (no backward) on a second view, so the limit is about 4/3 (forward ~1, backward ~2 units); the rest (queue,
InfoNCE over 1 + K logits, momentum update, logging) is the overhead this measures. Both run in the same process
on in-memory, already augmented batches (the augmentation is not part of the step), alternating (supervised,
MoCo, supervised, MoCo, ...). Prints a table and writes JSON. Not a test.

    python benchmarks/step_overhead.py --threads 2          # ResNet-18, CIFAR stem, batch 64, 32 px
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import lightning as L
import torch
from common import add_output_arguments, output_path, write_results
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from moco_lightning import MoCo
from moco_lightning.backbones import build_backbone
from moco_lightning.optim import build_optimizer


class Supervised(L.LightningModule):
    """The same backbone with a linear classifier, cross-entropy, SGD: the reference step."""

    def __init__(self, backbone: str, cifar_stem: bool, num_classes: int = 10, lr: float = 0.03) -> None:
        super().__init__()
        self.backbone, width = build_backbone(backbone, cifar_stem=cifar_stem)
        self.fc = nn.Linear(width, num_classes)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.fc(self.backbone(x)), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return build_optimizer(self.parameters(), "sgd", lr=self.lr, momentum=0.9, weight_decay=5e-4)  # as MoCo


class Batches(Dataset):
    """``steps`` ready batches of random images (one view, or two for MoCo), served by index."""

    def __init__(self, steps: int, batch: int, size: int, views: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.views = [torch.randn(batch, 3, size, size, generator=g) for _ in range(views)]
        self.labels = torch.randint(0, 10, (batch,), generator=g)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):
        return (self.views if len(self.views) > 1 else self.views[0]), self.labels


class StepTimer(L.Callback):
    """Wall and process CPU time between the ends of consecutive training steps (the whole loop iteration).

    With one thread, CPU time is what the step costs whatever else runs on the machine; wall time also counts the
    time the process waited for a core.
    """

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))

    def step_times(self, warmup: int) -> dict[str, float]:
        ends = self.ends[warmup:]
        return {"wall": statistics.median(b[0] - a[0] for a, b in zip(ends, ends[1:])),
                "cpu": statistics.median(b[1] - a[1] for a, b in zip(ends, ends[1:]))}


def timed_fit(module: L.LightningModule, views: int, args) -> dict[str, float]:
    steps = args.warmup + args.steps + 1
    loader = DataLoader(Batches(steps, args.batch, args.size, views), batch_size=None)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                        default_root_dir=args.work)
    trainer.fit(module, loader)
    return timer.step_times(args.warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--queue", type=int, default=4096, help="K (the official CIFAR demo: 4096)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true", help="model.channels_last for MoCo")
    parser.add_argument("--bn", default="split", choices=["split", "none"],
                        help="MoCo's BN mode: split (8 groups, the official CIFAR demo; one process's default) or "
                             "none (the plain BN of the supervised step)")
    parser.add_argument("--work", default="/tmp/step_overhead")
    add_output_arguments(parser, "step_overhead.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    runs: dict[str, list[dict[str, float]]] = {"supervised": [], "moco": []}
    for repeat in range(args.repeats):
        torch.manual_seed(repeat)
        supervised = Supervised(args.backbone, args.cifar_stem)
        runs["supervised"].append(timed_fit(supervised, 1, args))
        torch.manual_seed(repeat)
        # MoCo v2 with the official CIFAR-10 demo's numbers (dim 128, m 0.99, T 0.1, MLP head as v2)
        moco = MoCo(args.backbone, cifar_stem=args.cifar_stem, dim=128, mlp=True, queue_size=args.queue,
                    momentum=0.99, temperature=0.1, lr=0.03, weight_decay=5e-4, lr_schedule="cosine",
                    channels_last=args.channels_last, bn=args.bn)
        runs["moco"].append(timed_fit(moco, 2, args))
        sup, moc = runs["supervised"][-1], runs["moco"][-1]
        print(f"repeat {repeat}: supervised {sup['wall']:.3f} s/step ({sup['cpu']:.3f} CPU), MoCo {moc['wall']:.3f} "
              f"s/step ({moc['cpu']:.3f} CPU), ratio {moc['wall'] / sup['wall']:.3f} wall, "
              f"{moc['cpu'] / sup['cpu']:.3f} CPU, load {os.getloadavg()[0]:.1f}", flush=True)

    ratios = {kind: [m[kind] / s[kind] for m, s in zip(runs["moco"], runs["supervised"])] for kind in ("wall", "cpu")}
    print(f"\n{args.backbone} ({'CIFAR' if args.cifar_stem else 'ImageNet'} stem), batch {args.batch}, "
          f"{args.size} px, {args.threads} threads")
    print(f"{'step':<12} {'wall s/step per run':<26} {'CPU s/step per run':<26} {'images/s':>9}")
    for name, times in runs.items():
        wall = [t["wall"] for t in times]
        cpu = [t["cpu"] for t in times]
        print(f"{name:<12} {', '.join(f'{t:.3f}' for t in wall):<26} {', '.join(f'{t:.3f}' for t in cpu):<26} "
              f"{args.batch / min(wall):>9.1f}")
    for kind, values in ratios.items():
        print(f"MoCo / supervised ({kind}): {', '.join(f'{r:.3f}' for r in values)} (median "
              f"{statistics.median(values):.3f}; the key encoder's forward pass alone puts it near 1.33)")

    payload = {"benchmark": "step_overhead", "backbone": args.backbone, "cifar_stem": args.cifar_stem,
               "batch": args.batch, "size": args.size, "queue": args.queue, "threads": args.threads,
               "channels_last": args.channels_last, "seconds_per_step": runs, "ratios": ratios,
               "ratio_median": {kind: statistics.median(values) for kind, values in ratios.items()},
               "command": f"python benchmarks/step_overhead.py --threads {args.threads} --repeats {args.repeats} "
                          f"--steps {args.steps}"}
    write_results(payload, output_path(args, "step_overhead.json"))


if __name__ == "__main__":
    main()
