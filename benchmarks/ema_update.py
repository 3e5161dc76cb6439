"""Time one momentum update of a key encoder: fused ``torch._foreach_lerp_`` vs a Python loop per parameter.

    python benchmarks/ema_update.py --backbone resnet50 --repeats 20

Prints a table and writes JSON (--record: benchmarks/results/ema_update.json). Not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time

import torch
from common import add_output_arguments, output_path

from moco_lightning.backbones import build_backbone
from moco_lightning.ema import momentum_update


@torch.no_grad()
def loop_update(online: torch.nn.Module, target: torch.nn.Module, m: float) -> None:
    """The textbook form, one kernel per parameter: θk = m·θk + (1 − m)·θq."""
    for p_o, p_t in zip(online.parameters(), target.parameters()):
        p_t.data.mul_(m).add_(p_o.data, alpha=1.0 - m)


def time_it(fn, repeats: int, sync) -> float:
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add_output_arguments(parser, "ema_update.json")
    args = parser.parse_args()

    online, _ = build_backbone(args.backbone)
    online = online.to(args.device)
    target = copy.deepcopy(online)
    n_tensors = sum(1 for _ in online.parameters())
    n_params = sum(p.numel() for p in online.parameters())
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    rows = []
    for name, fn in (("foreach lerp (moco_lightning.ema)", lambda: momentum_update(online, target, 0.999)),
                     ("python loop mul_/add_", lambda: loop_update(online, target, 0.999))):
        seconds = time_it(fn, args.repeats, sync)
        rows.append({"method": name, "ms_per_update": round(1000 * seconds, 3)})

    # the two forms agree
    t1, t2 = copy.deepcopy(target), copy.deepcopy(target)
    momentum_update(online, t1, 0.9)
    loop_update(online, t2, 0.9)
    max_diff = max((a - b).abs().max().item() for a, b in zip(t1.parameters(), t2.parameters()))

    print(f"{args.backbone}: {n_tensors} parameter tensors, {n_params / 1e6:.1f} M parameters, {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| method | ms per update |\n|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['ms_per_update']} |")
    print(f"max |foreach - loop| after one update: {max_diff:.2e}")
    out = output_path(args, "ema_update.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "ema_update", "backbone": args.backbone, "device": args.device,
                               "torch": torch.__version__, "threads": torch.get_num_threads(),
                               "machine": platform.machine(), "parameter_tensors": n_tensors,
                               "parameters": n_params, "results": rows, "max_abs_diff": max_diff}, indent=2))


if __name__ == "__main__":
    main()
