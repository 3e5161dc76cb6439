"""One prepared check for a GPU: the MoCo v2 step, the supervised step, the augmentation, host syncs, a real run.

Run by ``benchmarks/gpu_check.sh`` on one GPU (sized for an H100: under 8 minutes). In order, each part timed:

1. the v2 batched augmentation (uint8 images on the device, ``moco_lightning.data.batch_augment``) and the MoCo
   v2 ResNet-50 step (query and key encoders, InfoNCE against 65,536 keys, SGD, momentum update) in bf16,
   channels-last, eager, with split BN (8 groups, the one-GPU default) and with plain BN; images per second of
   the step and of the augmentation (CUDA events, ``benchmarks/gpu_step.py``'s loop);
2. the same supervised step (ResNet-50, linear classifier, cross-entropy, SGD) for the MoCo/supervised ratio;
3. every host-device synchronisation in those timed steps and augmentations
   (``torch.cuda.set_sync_debug_mode("warn")``), by file and line of this project's code (and the innermost frame);
4. a real ``train.py`` run: DDP (NCCL) with one GPU, ``16-mixed``, split BN, the batch augmentation on the GPU,
   the kNN monitor and the checkpoint callbacks, a few dozen steps on the digits that ship with scikit-learn
   (nothing is downloaded);
5. the compiled step (``torch.compile``, inductor) of the MoCo and supervised variants, while the time budget
   (``--budget-s``) lasts: each compile takes a minute or more; a variant that does not fit is listed as skipped.

Prints a table and writes JSON: ``benchmarks/results/gpu_check.json`` on a GPU; ``--dry-run`` runs every part at
tiny sizes on the CPU (ResNet-18, 32 px, gloo, bf16-mixed for the run, the ``eager`` compile backend) and writes
into a temporary folder (or ``--out``). Not a test; ``tests/test_gpu_check.py`` runs the dry form.

    benchmarks/gpu_check.sh                 # on one GPU
    DRY=1 benchmarks/gpu_check.sh           # the CPU dry form (a minute)
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from gpu_step import Loop, hardware, timed
from torch import nn
from torch.nn import functional as F

from moco_lightning.backbones import build_backbone
from moco_lightning.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
#: Frames of these folders are "ours": a sync is reported at the innermost of them (and the innermost frame).
OWN_CODE = (str(ROOT / "src" / "moco_lightning"), str(ROOT / "benchmarks"))
#: The timing code: its explicit ``synchronize`` / ``elapsed_time`` calls are not counted.
HARNESS = str(ROOT / "benchmarks")


# ------------------------------------------------------------------------------------------------ host syncs
@contextmanager
def record_syncs(device: torch.device) -> Iterator[Counter]:
    """Count the host-device synchronisations in the block by ``"file:line"`` of the code that caused them.

    On a CUDA device torch warns at every synchronising call (``set_sync_debug_mode("warn")``); each warning is
    recorded at the innermost frame of this project's code on the Python stack (where the fix goes), followed by
    the innermost frame of all (kornia's, torch's) when that is another one. Elsewhere nothing synchronises; the
    recording of warnings whose message names a synchronisation works the same.
    """
    found: Counter = Counter()

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchroniz" not in str(message).lower():
            return
        stack = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith("warnings.py")]
        stack = [f for f in stack if f.filename != __file__ or f.name != "show"]
        if stack and stack[-1].filename.startswith(HARNESS) and any(
                call in (stack[-1].line or "") for call in ("synchronize", "elapsed_time")):
            return  # the timer's own synchronisation, not the step's
        own = [f for f in stack if f.filename.startswith(OWN_CODE)]
        where = f"{_short(own[-1].filename)}:{own[-1].lineno}" if own else f"{_short(filename)}:{lineno}"
        inner = f"{_short(filename)}:{lineno}"
        found[where if inner == where else f"{where} (in {inner})"] += 1

    cuda = device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)


def _short(path: str) -> str:
    """``path`` relative to the repository (or to its site-packages folder) for a readable location."""
    for base in (str(ROOT) + os.sep, "site-packages" + os.sep):
        if base in path:
            return path.split(base, 1)[1]
    return path


# ----------------------------------------------------------------------------------------- supervised step
class SupervisedLoop:
    """The supervised reference step: the same backbone, a linear classifier, cross-entropy, SGD; one view."""

    def __init__(self, args: argparse.Namespace, device: torch.device, compiled: bool) -> None:
        torch.manual_seed(0)
        backbone, width = build_backbone(args.backbone)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = nn.Sequential(backbone, nn.Linear(width, 1000)).to(device).to(memory_format=fmt).train()
        if compiled:
            self.model[0].compile(**({"backend": args.compile_backend} if args.compile_backend else {}))
        self.optimizer = build_optimizer(list(self.model.parameters()), "sgd", lr=0.1 * args.batch / 256,
                                         momentum=0.9, weight_decay=1e-4)
        self.images = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=fmt)
        self.labels = torch.randint(0, 1000, (args.batch,), device=device)
        self.amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()
        self.device = device

    def step(self) -> None:
        with self.amp:
            loss = F.cross_entropy(self.model(self.images), self.labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def time_supervised(loop: SupervisedLoop, warmup: int, steps: int) -> tuple[float, float, Counter]:
    """Warm-up seconds, seconds per step (CUDA events on a GPU, wall time elsewhere), the timed steps' syncs."""
    start = time.perf_counter()
    for _ in range(warmup):
        loop.step()
    loop.synchronize()
    warmup_s = time.perf_counter() - start
    cuda = loop.device.type == "cuda"
    with record_syncs(loop.device) as syncs:
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        for _ in range(steps):
            loop.step()
        if cuda:
            end.record()
            loop.synchronize()
            return warmup_s, begin.elapsed_time(end) / 1e3 / steps, syncs
    return warmup_s, (time.perf_counter() - start) / steps, syncs


# ------------------------------------------------------------------------------------------------ variants
def moco_variant(args: argparse.Namespace, device: torch.device, bn: str, compiled: bool) -> dict:
    """One MoCo v2 variant: warm-up, then the timed loop with its host syncs recorded."""
    settings = argparse.Namespace(**{**vars(args), "bn": bn})
    loop = Loop(settings, device, compiled)
    loop.model.configure_bn(1)  # one process: split BN's 8 groups (or plain BN) from the first step on
    start = time.perf_counter()
    for i in range(args.warmup):  # compilation and cudnn.benchmark's search happen here
        loop.step(*loop.augment_views(i))
    loop.synchronize()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with record_syncs(device) as syncs:
        times = timed(loop, args.steps, args.warmup)
    n = args.steps * args.batch
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del loop
    return {"step": "moco_v2", "bn": bn, "compiled": compiled, "warmup_s": round(warmup_s, 1),
            "step_images_per_s": round(n / times["step_s"], 1),
            "augment_images_per_s": round(n / times["augment_s"], 1),
            "peak_memory_gib": None if peak is None else round(peak, 2), "syncs": dict(syncs)}


def supervised_variant(args: argparse.Namespace, device: torch.device, compiled: bool) -> dict:
    """The supervised step at the same batch, size, precision and layout."""
    loop = SupervisedLoop(args, device, compiled)
    warmup_s, per_step, syncs = time_supervised(loop, args.warmup, args.steps)
    del loop
    return {"step": "supervised", "bn": "plain", "compiled": compiled, "warmup_s": round(warmup_s, 1),
            "step_images_per_s": round(args.batch / per_step, 1), "syncs": dict(syncs)}


# --------------------------------------------------------------------------------------------- train.py run
def train_run(args: argparse.Namespace, out: Path) -> dict:
    """``python train.py`` under DDP with one device: the callbacks, the checkpoints and the logs of a real run."""
    run_dir = out / "train_run"
    overrides = ["trainer=ddp", "trainer.devices=1", f"trainer.precision={args.run_precision}", "model.bn=split",
                 "data=digits", "data.batch_augmentation=true", f"data.image_size={args.run_image_size}",
                 "data.batch_size=64", f"trainer.max_epochs={args.run_epochs}", "callbacks.knn.every_n_epochs=1",
                 "trainer.log_every_n_steps=5", "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run_dir}"]
    if args.dry_run:
        overrides += ["trainer.accelerator=cpu", "trainer.limit_train_batches=2", "data.eval_batch_size=128",
                      "model.queue_size=64", "callbacks.embedding_map.method=pca"]
    command = [sys.executable, str(ROOT / "train.py"), *overrides]
    print("train.py run:", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.run_timeout_s,
                                env={**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1"})
    except subprocess.TimeoutExpired as err:  # the rest of the check still reports
        text = [err.stdout or "", err.stderr or ""]
        text = [t.decode(errors="replace") if isinstance(t, bytes) else t for t in text]
        result = subprocess.CompletedProcess(command, f"timeout after {args.run_timeout_s} s", *text)
    wall = time.perf_counter() - start
    (out / "train_run.log").write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
    metrics = _last_metrics(run_dir / "csv" / "metrics.csv")
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
    lines = (result.stdout + result.stderr).splitlines()
    facts = {
        "returncode": result.returncode, "wall_s": round(wall, 1), "checkpoints": checkpoints,
        "steps": metrics.get("step"), "knn_top1": metrics.get("val/knn_top1"), "loss": metrics.get("train/loss"),
        "backend": "nccl" if any("nccl" in line.lower() for line in lines) else
        ("gloo" if any("gloo" in line.lower() for line in lines) else None),
        "cpus_line": next((line.split("] ", 1)[-1] for line in lines if "CPUs:" in line), None),
        "overrides": overrides,
    }
    if result.returncode != 0:
        facts["error_tail"] = result.stderr[-2000:]
    return facts


def _last_metrics(path: Path) -> dict[str, Any]:
    """The last logged value of every column of a Lightning ``metrics.csv`` (empty when there is none)."""
    last: dict[str, Any] = {}
    try:
        with path.open() as file:
            for row in csv.DictReader(file):
                last.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    except (OSError, ValueError):
        return last
    return last


# -------------------------------------------------------------------------------------------------- report
def table(results: list[dict]) -> str:
    """The step results as aligned text."""
    lines = [f"{'step':<11}{'BN':<7}{'compiled':<10}{'step img/s':>11}{'aug img/s':>11}{'warm-up s':>11}  syncs"]
    for r in results:
        if r.get("skipped"):
            lines.append(f"{r['step']:<11}{r['bn']:<7}{str(r['compiled']):<10}  skipped: {r['skipped']}")
            continue
        syncs = ", ".join(f"{k} x{v}" for k, v in r["syncs"].items()) or "none"
        aug = r.get("augment_images_per_s", "")
        lines.append(f"{r['step']:<11}{r['bn']:<7}{str(r['compiled']):<10}{r['step_images_per_s']:>11}{aug:>11}"
                     f"{r['warmup_s']:>11}  {syncs}")
    return "\n".join(lines)


def ratios(results: list[dict]) -> dict[str, float]:
    """Supervised images/s over MoCo's, per BN mode and compile: how many supervised steps one MoCo step costs."""
    done = [r for r in results if not r.get("skipped")]
    out = {}
    for sup in (r for r in done if r["step"] == "supervised"):
        for moco in (r for r in done if r["step"] == "moco_v2" and r["compiled"] == sup["compiled"]):
            name = f"{'compiled' if sup['compiled'] else 'eager'}, {moco['bn']} BN"
            out[name] = round(sup["step_images_per_s"] / moco["step_images_per_s"], 2)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU; writes to a temporary folder")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results on a GPU, a "
                                                    "temporary folder for --dry-run)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no compiled variant after this many seconds (the check must end within 8 min)")
    parser.add_argument("--skip-run", action="store_true", help="no train.py run")
    args = parser.parse_args(argv)
    big = not args.dry_run
    args.device = "cuda" if big else "cpu"
    args.backbone = "resnet50" if big else "resnet18"
    args.batch, args.size, args.queue = (256, 224, 65536) if big else (16, 32, 32)  # split BN: 8 groups of 2
    args.warmup, args.steps = (10, 30) if big else (1, 1)
    args.precision, args.channels_last = "bf16", True
    args.compile_backend = None if big else "eager"  # dry: dynamo's capture without code generation
    args.run_precision = "16-mixed" if big else "bf16-mixed"  # Lightning has no fp16 autocast on the CPU
    args.run_image_size, args.run_epochs = (32, 2) if big else (16, 1)  # digits: 22 steps per epoch at batch 64
    args.run_timeout_s = 240 if big else 80
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here: run on a GPU machine, or DRY=1 benchmarks/gpu_check.sh for "
                         "the CPU dry form")
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results" if not args.dry_run
                                           else Path(tempfile.mkdtemp(prefix="gpu_check_")))
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    began = time.perf_counter()
    print(f"gpu_check on {hardware(device)}{' (dry run)' if args.dry_run else ''}", flush=True)

    results: list[dict] = []
    for bn in ("split", "none"):
        results.append(moco_variant(args, device, bn, compiled=False))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    results.append(supervised_variant(args, device, compiled=False))
    print(table(results[-1:]).splitlines()[-1], flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    run = None if args.skip_run else train_run(args, out)
    if run is not None:
        print(f"train.py run: status {run['returncode']}, {run['wall_s']} s, steps {run['steps']}, kNN top-1 "
              f"{run['knn_top1']}, checkpoints {run['checkpoints']}, backend {run['backend']}", flush=True)

    for kind, bn in (("moco_v2", "split"), ("moco_v2", "none"), ("supervised", "plain")):
        elapsed = time.perf_counter() - began
        if elapsed > args.budget_s:
            results.append({"step": kind, "bn": bn, "compiled": True,
                            "skipped": f"time budget ({elapsed:.0f} s > {args.budget_s:.0f} s)"})
        elif kind == "moco_v2":
            results.append(moco_variant(args, device, bn, compiled=True))
        else:
            results.append(supervised_variant(args, device, compiled=True))
        torch._dynamo.reset()
        print(table(results[-1:]).splitlines()[-1], flush=True)

    payload = {"benchmark": "gpu_check", "hardware": hardware(device), "dry_run": args.dry_run,
               "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "settings": {k: getattr(args, k) for k in ("backbone", "batch", "size", "queue", "precision",
                                                          "channels_last", "warmup", "steps", "compile_backend")},
               "steps": results, "supervised_over_moco": ratios(results), "train_run": run,
               "wall_s": round(time.perf_counter() - began, 1)}
    print()
    print(table(results))
    print("supervised img/s over MoCo img/s:", payload["supervised_over_moco"])
    path = out / "gpu_check.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path} ({payload['wall_s']} s)")
    if run is not None and run["returncode"] != 0:
        raise SystemExit(f"error: the train.py run failed (status {run['returncode']}); its log: "
                         f"{out / 'train_run.log'}")
    return payload


if __name__ == "__main__":
    main()
