"""MoCo v2 on one GPU at the limit: ResNet-50, batch 256, 224 px, bf16, channels-last, with and without compile.

One command, a few minutes: synthetic uint8 images already on the GPU go through the batched augmentation
(``moco_lightning.data.batch_augment``, v2 "aug+") and the MoCo step (query and key encoders, InfoNCE against a
queue of 65,536 keys, SGD, momentum update) in a bare loop, for two variants: eager and ``model.compile``. For
each: images per second of the step alone (GPU time between CUDA events) and of the whole loop (augmentation +
step, wall time), peak GPU memory, the host-device synchronisations seen in the timed iterations
(``torch.cuda.set_sync_debug_mode("warn")``), and a one-iteration profile (top operations by GPU time). Writes
JSON and replaces its section of ``benchmarks/RESULTS.md`` with the date and the hardware. Not a test.

    python benchmarks/gpu_step.py
    python benchmarks/gpu_step.py --device cpu --backbone resnet18 --batch 8 --size 32 --queue 64 --steps 2 \
        --warmup 1 --compile-backend aot_eager --no-results-md          # a smoke test on the CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from common import add_output_arguments, output_path
from torch.profiler import ProfilerActivity, profile

from moco_lightning import MoCo
from moco_lightning.data.batch_augment import build_batch_augmentation
from moco_lightning.optim import build_optimizer
from moco_lightning.transforms import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- gpu_step:begin -->", "<!-- gpu_step:end -->"


class Loop:
    """The augmentation and the MoCo step of one variant, with its model, optimizer and source images."""

    def __init__(self, args: argparse.Namespace, device: torch.device, compiled: bool) -> None:
        torch.manual_seed(0)
        compile_option = ({"backend": args.compile_backend} if args.compile_backend else True) if compiled else False
        self.model = MoCo(args.backbone, dim=128, mlp=True, queue_size=args.queue, momentum=0.999, temperature=0.2,
                          channels_last=args.channels_last, compile=compile_option, bn=args.bn).to(device).train()
        params = [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith("encoder_k.")]
        self.optimizer = build_optimizer(params, "sgd", lr=0.03 * args.batch / 256, momentum=0.9, weight_decay=1e-4)
        self.augment = build_batch_augmentation("v2", args.size, IMAGENET_MEAN, IMAGENET_STD, crop_on_device=True)
        self.generator = torch.Generator().manual_seed(0)
        source = round(args.size * 256 / 224)  # like the 256 px short side of the ImageNet evaluation resize
        self.sources = [torch.randint(0, 256, (args.batch, 3, source, source), dtype=torch.uint8, device=device)
                        for _ in range(2)]
        self.amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext())
        self.device = device

    def augment_views(self, i: int) -> list[torch.Tensor]:
        return self.augment(self.sources[i % 2], self.generator)

    def step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
        fmt = self.model.memory_format
        im_q, im_k = im_q.contiguous(memory_format=fmt), im_k.contiguous(memory_format=fmt)
        with self.amp:
            _, q = self.model.encode_query(im_q)
            k = self.model.encode_key(im_k)
            loss, _, _ = self.model.contrastive_loss(q, k)
        self.model.dequeue_and_enqueue(k)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.model.momentum_update(0.999)
        return loss

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(loop: Loop, steps: int, start: int) -> dict:
    """Run ``steps`` iterations; GPU time of the step between events, wall time of the whole loop."""
    cuda = loop.device.type == "cuda"
    marks = []
    loop.synchronize()
    begin = time.perf_counter()
    for i in range(start, start + steps):
        if cuda:
            events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            events[0].record()
            views = loop.augment_views(i)
            events[1].record()
            loop.step(*views)
            events[2].record()
            marks.append(events)
        else:
            t0 = time.perf_counter()
            views = loop.augment_views(i)
            t1 = time.perf_counter()
            loop.step(*views)
            marks.append((t0, t1, time.perf_counter()))
    loop.synchronize()
    wall = time.perf_counter() - begin
    if cuda:
        augment_s = sum(e[0].elapsed_time(e[1]) for e in marks) / 1e3
        step_s = sum(e[1].elapsed_time(e[2]) for e in marks) / 1e3
    else:
        augment_s = sum(t1 - t0 for t0, t1, _ in marks)
        step_s = sum(t2 - t1 for _, t1, t2 in marks)
    return {"wall_s": wall, "augment_s": augment_s, "step_s": step_s}


def top_ops(loop: Loop, i: int, top: int) -> list[dict]:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if loop.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        loop.step(*loop.augment_views(i))
        loop.synchronize()
    attr = "self_device_time_total" if loop.device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events) or 1
    rows = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:top]
    return [{"op": e.key, "ms": round(getattr(e, attr) / 1e3, 2), "share": round(getattr(e, attr) / total, 3),
             "calls": e.count} for e in rows]


def run_variant(name: str, compiled: bool, args: argparse.Namespace, device: torch.device) -> dict:
    loop = Loop(args, device, compiled)
    start = time.perf_counter()
    for i in range(args.warmup):  # compilation happens here
        loop.step(*loop.augment_views(i))
    loop.synchronize()
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        times = timed(loop, args.steps, args.warmup)
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode(0)
    syncs = sorted({str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()})
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    n = args.steps * args.batch
    result = {"variant": name, "warmup_s": round(warmup_s, 1), "step_images_per_s": round(n / times["step_s"], 1),
              "augment_images_per_s": round(n / times["augment_s"], 1),
              "loop_images_per_s": round(n / times["wall_s"], 1), "peak_memory_gib": round(peak, 2),
              "syncs_in_timed_steps": syncs, "profile": top_ops(loop, args.warmup + args.steps, args.top)}
    print(f"{name}: {result['step_images_per_s']} img/s step, {result['loop_images_per_s']} img/s loop, "
          f"{result['augment_images_per_s']} img/s augmentation, peak {result['peak_memory_gib']} GiB, "
          f"warm-up {result['warmup_s']} s, syncs {syncs or 'none'}", flush=True)
    del loop
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    return f"CPU ({platform.processor() or platform.machine()}), torch {torch.__version__}"


def markdown(results: list[dict], args: argparse.Namespace, device: torch.device, command: str) -> str:
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [BEGIN, "## MoCo v2 on one GPU (benchmarks/gpu_step.py)", "",
             f"`{command}`, {date}, {hardware(device)}: {args.backbone}, batch {args.batch}, {args.size} px, "
             f"{args.precision}, channels-last {args.channels_last}, K {args.queue}; synthetic uint8 images on the "
             "device through the batched v2 augmentation; a bare loop (the Trainer's own overhead is measured by "
             "benchmarks/lightning_overhead.py).", "",
             "| variant | step img/s | loop img/s | augmentation img/s | peak GiB | warm-up s | syncs in the timed "
             "steps |", "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['step_images_per_s']} | {r['loop_images_per_s']} | "
                     f"{r['augment_images_per_s']} | {r['peak_memory_gib']} | {r['warmup_s']} | "
                     f"{len(r['syncs_in_timed_steps'])} |")
    for r in results:
        lines += ["", f"One iteration of `{r['variant']}`, top operations by GPU time:", "",
                  "| operation | ms | share | calls |", "|---|---|---|---|"]
        lines += [f"| `{p['op'][:60]}` | {p['ms']} | {100 * p['share']:.1f}% | {p['calls']} |" for p in r["profile"]]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_results_md(section: str, path: Path) -> None:
    text = path.read_text() if path.exists() else "# Measured results\n"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END) + r"\n?", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--queue", type=int, default=65536)
    parser.add_argument("--precision", choices=["bf16", "32"], default="bf16")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bn", default="auto", choices=["auto", "split", "none"],
                        help="MoCo's BN mode (auto on one GPU: split BN, 8 groups, as a one-device run trains)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default: inductor)")
    parser.add_argument("--variants", default="eager,compile")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--top", type=int, default=12)
    add_output_arguments(parser, "gpu_step.json")
    parser.add_argument("--results-md", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or --device cpu with small settings")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    results = [run_variant(name, name == "compile", args, device) for name in args.variants.split(",")]
    command = "python benchmarks/gpu_step.py" + ("" if device.type == "cuda" else f" --device {args.device} ...")
    payload = {"benchmark": "gpu_step", "hardware": hardware(device), "date": datetime.datetime.now().isoformat(),
               "settings": {k: v for k, v in vars(args).items() if k not in ("out", "record", "results_md")},
               "results": results}
    out = output_path(args, "gpu_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    if args.results_md:
        write_results_md(markdown(results, args, device, command), ROOT / "benchmarks/RESULTS.md")
        print("updated benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
