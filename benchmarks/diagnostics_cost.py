"""What the diagnostics cost: per training step (with and without), per logging step, and per kNN-monitor run.

    python benchmarks/diagnostics_cost.py                  # digits 16 px, ResNet-18, batch 64 (the default run)
    python benchmarks/diagnostics_cost.py --rounds 5 --steps 30

Three measurements, each interleaved A/B in one process (the variants take turns, so a change of machine load hits
all of them alike), with the load average before and after:

1. ms per training step of a real ``Trainer.fit`` (timed from ``on_train_batch_start`` to ``on_train_batch_end``,
   first steps of each fit skipped): diagnostics off and on, at ``log_every_n_steps=10`` (the default) and at
   ``log_every_n_steps=1`` (the worst case: every step).
2. ms of one logging step's diagnostics (``DiagnosticsMonitor.step_metrics``: drift, key ages, similarities) next to
   one momentum update of the key encoder: the default run (ResNet-18, K 64, batch 64) and ImageNet-sized queues
   (ResNet-18 / ResNet-50, K 65,536, batch 256).
3. seconds of the epoch-end work on the digits validation set: alignment / uniformity, the embedding map (t-SNE),
   next to the kNN monitor itself.

Prints tables and writes JSON (--record: benchmarks/results/diagnostics_cost.json). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from types import SimpleNamespace

import lightning as L
import torch
from common import add_output_arguments, output_path, time_call
from lightning.pytorch.callbacks import Callback

from moco_lightning import MoCo
from moco_lightning.data import DigitsDataModule
from moco_lightning.eval.diagnostics_monitor import DiagnosticsMonitor
from moco_lightning.eval.embedding_map import EmbeddingMap
from moco_lightning.eval.knn import KNNMonitor


class StepTimer(Callback):
    """Wall time of each training step (forward, backward, optimizer, EMA and the step's callbacks)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: D102
        self.times.append(time.perf_counter() - self._start)


def digits_model(queue_size: int = 64) -> MoCo:
    """The default run's module (conf/recipe/moco/digits_resnet18.yaml)."""
    return MoCo("resnet18", cifar_stem=False, dim=128, mlp=True, queue_size=queue_size, momentum=0.99,
                temperature=0.4, lr=0.12, scale_lr=True, lr_schedule="cosine", lr_interval="step")


def time_steps(data: DigitsDataModule, steps: int, enabled: bool, log_every: int, skip: int) -> list[float]:
    """Per-step wall times of one fit of ``steps`` steps (the first ``skip`` dropped)."""
    L.seed_everything(0, verbose=False)
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=log_every,
                        callbacks=[DiagnosticsMonitor(enabled=enabled), timer])
    trainer.fit(digits_model(), datamodule=data)
    return timer.times[skip:]


def step_diagnostics(backbone: str, queue_size: int, batch: int, repeats: int) -> dict[str, float]:
    """ms of one logging step's diagnostics vs one momentum update, on a module with a full-size queue."""
    model = MoCo(backbone, dim=128, mlp=True, queue_size=queue_size)
    monitor = DiagnosticsMonitor()
    logits = torch.randn(batch, 1 + queue_size) / 0.2
    outputs = {"logits": logits}
    metrics = time_call(lambda: monitor.step_metrics(model, outputs, 100), repeats)
    ema = time_call(lambda: model.momentum_update(0.999), repeats)
    return {"backbone": backbone, "queue_size": queue_size, "batch": batch,
            "ms_step_metrics": round(1000 * metrics, 2), "ms_momentum_update": round(1000 * ema, 2)}


def epoch_end(data: DigitsDataModule, rounds: int) -> dict[str, float]:
    """Seconds of each epoch-end job on the digits validation set (interleaved over ``rounds``)."""
    model = digits_model()
    trainer = SimpleNamespace(datamodule=data, precision_plugin=None, current_epoch=0, global_step=0, loggers=[],
                              default_root_dir=tempfile.mkdtemp(prefix="moco-bench-"), is_global_zero=True)
    knn, diagnostics, embedding_map = KNNMonitor(), DiagnosticsMonitor(), EmbeddingMap(method="tsne")
    jobs = {  # one instance each, as in a run: the alignment views are augmented at the first run only
        "kNN monitor (1,437 bank + 360 queries)": lambda: knn.compute(trainer, model),
        "alignment + uniformity (360 images, 3 embeddings)": lambda: diagnostics.representation_metrics(
            trainer, model),
        "alignment + uniformity, first run (views augmented)": lambda: DiagnosticsMonitor().representation_metrics(
            trainer, model),
        "embedding map (t-SNE of 360, PNG)": lambda: embedding_map.draw(trainer, model, "bench", 0),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for job in jobs.values():  # warm-up (imports, allocations)
        job()
    for _ in range(rounds):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            times[name].append(time.perf_counter() - start)
    return {name: round(statistics.median(values), 3) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each measurement")
    parser.add_argument("--steps", type=int, default=25, help="training steps per fit")
    parser.add_argument("--skip", type=int, default=5, help="first steps of each fit not counted")
    parser.add_argument("--image-size", type=int, default=16)
    add_output_arguments(parser, "diagnostics_cost.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    data = DigitsDataModule(batch_size=64, image_size=args.image_size)

    variants = {"off, log_every_n_steps=10": (False, 10), "on, log_every_n_steps=10": (True, 10),
                "off, log_every_n_steps=1": (False, 1), "on, log_every_n_steps=1": (True, 1)}
    step_times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (enabled, log_every) in variants.items():
            step_times[name] += time_steps(data, args.steps, enabled, log_every, args.skip)
    step_rows = []
    for name, times in step_times.items():
        off = statistics.median(step_times[name.replace("on,", "off,", 1)])  # the same logging cadence
        step_rows.append({"variant": name, "ms_per_step_median": round(1000 * statistics.median(times), 1),
                          "overhead_vs_off_percent": round(100 * (statistics.median(times) / off - 1), 1),
                          "steps": len(times)})

    micro = [step_diagnostics("resnet18", 64, 64, 10), step_diagnostics("resnet18", 65536, 256, 10),
             step_diagnostics("resnet50", 65536, 256, 5)]
    end = epoch_end(data, args.rounds)
    load_after = os.getloadavg()

    print(f"digits {args.image_size} px, ResNet-18, batch 64, K 64; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print("\n| training step | ms per step (median) | vs off at the same cadence | steps timed |\n|---|---|---|---|")
    for row in step_rows:
        print(f"| {row['variant']} | {row['ms_per_step_median']} | {row['overhead_vs_off_percent']:+.1f} % | "
              f"{row['steps']} |")
    print("\n| one logging step's diagnostics | ms | one momentum update, ms |\n|---|---|---|")
    for row in micro:
        print(f"| {row['backbone']}, K {row['queue_size']}, batch {row['batch']} | {row['ms_step_metrics']} | "
              f"{row['ms_momentum_update']} |")
    print("\n| epoch-end job (digits val) | seconds (median) |\n|---|---|")
    for name, seconds in end.items():
        print(f"| {name} | {seconds} |")
    out = output_path(args, "diagnostics_cost.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "diagnostics_cost", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "cpus": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": load_after, "image_size": args.image_size, "rounds": args.rounds,
        "steps_per_fit": args.steps, "skipped_steps": args.skip, "training_step": step_rows,
        "logging_step": micro, "epoch_end_seconds": end}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
