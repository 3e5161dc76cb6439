"""One training step of the default run under torch.profiler: the operations that take the time.

Composes the default config (`python train.py` plus any overrides), builds it as the CLI does, trains a few steps
with the Trainer and profiles one whole loop iteration after warm-up: fetching the batch, the transfer hook (the
batch augmentation), the step, backward, SGD and the momentum update. Prints the top operations by self CPU time
and writes them to JSON. Not a test.

    python benchmarks/profile_step.py --threads 2
    python benchmarks/profile_step.py --threads 2 data.batch_augmentation=false    # the per-image path
"""

from __future__ import annotations

import argparse
import os
import tempfile

import lightning as L
import torch
from common import add_output_arguments, output_path, write_results
from hydra import compose, initialize_config_dir
from torch.profiler import ProfilerActivity, profile

from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.train import build


class ProfileOneStep(L.Callback):
    """Profile from the end of step ``at - 1`` to the end of step ``at``: one whole loop iteration."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.profiler: profile | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at - 1 and self.profiler is None:
            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=False)
            self.profiler.__enter__()
        elif trainer.global_step == self.at and self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step", type=int, default=6, help="the optimizer step to profile (after warm-up)")
    parser.add_argument("--top", type=int, default=15)
    add_output_arguments(parser, "profile_step.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out_dir = tempfile.mkdtemp(prefix="profile_step_")
    overrides = [f"paths.output_dir={out_dir}", "callbacks.progress_bar.refresh_rate=0", "~callbacks.knn",
                 "~callbacks.model_checkpoint", "logger=csv", *args.overrides]
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    L.seed_everything(cfg.seed)
    datamodule, model, trainer = build(cfg)
    probe = ProfileOneStep(args.step)
    trainer.callbacks.append(probe)
    trainer.fit(model, datamodule=datamodule)
    assert probe.profiler is not None, "the run ended before the profiled step"

    events = probe.profiler.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.top]
    table = [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2),
              "share": round(e.self_cpu_time_total / total_us, 3), "calls": e.count} for e in rows]
    print(f"one loop iteration: {total_us / 1e3:.1f} ms of self CPU time, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'operation':<44} {'self ms':>9} {'share':>7} {'calls':>6}")
    for row in table:
        print(f"{row['op'][:44]:<44} {row['self_cpu_ms']:>9.2f} {100 * row['share']:>6.1f}% {row['calls']:>6}")

    payload = {"benchmark": "profile_step", "overrides": args.overrides, "threads": args.threads,
               "step": args.step, "total_self_cpu_ms": round(total_us / 1e3, 1), "top": table,
               "command": " ".join(["python benchmarks/profile_step.py", f"--threads {args.threads}",
                                    *args.overrides])}
    write_results(payload, output_path(args, "profile_step.json"))


if __name__ == "__main__":
    main()
