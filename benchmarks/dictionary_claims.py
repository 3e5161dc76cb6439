"""MoCo's dictionary claims on Fashion-MNIST: one figure and one table from the two sweeps of issue 29.

Reads the job folders of ``hparams_search=dictionary_size`` (queue size K at m 0.99) and ``hparams_search=momentum``
(momentum m at K 4,096; its m = 0.99 point is the K sweep's K = 4,096 job), each job's ``csv/metrics.csv`` and
``.hydra/`` configs, and draws one 2 x 2 figure: kNN top-1 after each epoch (top: K left, m right, the encoder at
initialisation as a dashed line) and the pretext loss over its chance level ln(K + 1) (bottom; 1.0 = the logits
cannot tell the positive from the K negatives).
Prints a table and writes it as JSON. Not a test.

    python benchmarks/dictionary_claims.py --size /work/runs/claims/dictionary_size \\
        --momentum /work/runs/claims/momentum --init-knn 0.768 \\
        --figure docs/images/fashion_mnist_dictionary_claims.png \\
        --json benchmarks/results/fashion_mnist_dictionary_claims.json
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

SMOOTH_STEPS = 50  # the loss curve and the final loss: means over windows of this many optimizer steps


def _column(rows: list[dict[str, str]], name: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[name])) for row in rows if row.get(name)]


def read_job(folder: Path) -> dict:
    """One job: its overrides, kNN per epoch, loss per logged step, final values."""
    overrides = dict(line.split("=", 1) for line in yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()))
    config = yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())
    with open(folder / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    knn = [value for _, value in _column(rows, "val/knn_top1")]
    loss = _column(rows, "train/loss")
    acc = _column(rows, "train/acc_top1")
    queue_size = int(config["model"]["queue_size"])
    tail = [value for step, value in loss if step > loss[-1][0] - SMOOTH_STEPS] if loss else []
    return {
        "folder": str(folder), "overrides": overrides, "queue_size": queue_size,
        "momentum": float(config["model"]["momentum"]), "epochs": len(knn), "knn_top1": knn,
        "final_knn_top1": knn[-1] if knn else None, "loss": loss, "acc_top1": acc,
        "chance": math.log(queue_size + 1),
        "final_loss": sum(tail) / len(tail) if tail else None,
    }


def read_sweep(folder: Path) -> list[dict]:
    """Every job folder of a sweep that has logged metrics, in job order."""
    jobs = [p for p in folder.iterdir() if p.is_dir() and (p / "csv" / "metrics.csv").exists()]
    return [read_job(p) for p in sorted(jobs, key=lambda p: int(p.name) if p.name.isdigit() else 0)]


def _smoothed(points: list[tuple[int, float]], window: int = SMOOTH_STEPS) -> tuple[list[int], list[float]]:
    """Means of the logged values over consecutive windows of ``window`` optimizer steps."""
    chunks: dict[int, list[float]] = {}
    for step, value in points:
        chunks.setdefault(step // window, []).append(value)
    return [(k + 1) * window for k in chunks], [sum(v) / len(v) for v in chunks.values()]


def figure(size_jobs: list[dict], momentum_jobs: list[dict], init_knn: float | None, path: Path) -> None:
    """The 2 x 2 figure: kNN per epoch (top) and loss / chance (bottom), for K (left) and m (right)."""
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="row")
    columns = ((size_jobs, "queue_size", "K", "queue size K at m = 0.99"),
               (momentum_jobs, "momentum", "m", "momentum m at K = 4,096"))
    for col, (jobs, key, symbol, title) in enumerate(columns):
        top, bottom = axes[0, col], axes[1, col]
        for job in jobs:
            label = f"{symbol} = {job[key]:,}" if key == "queue_size" else f"{symbol} = {job[key]:g}"
            top.plot(range(1, len(job["knn_top1"]) + 1), [100 * v for v in job["knn_top1"]], marker="o", label=label)
            steps, values = _smoothed(job["loss"])
            bottom.plot(steps, [v / job["chance"] for v in values], label=label)
        if init_knn is not None:
            top.axhline(100 * init_knn, color="grey", linestyle="--", label="encoder at init")
        top.set(title=f"kNN top-1, {title}", xlabel="epoch", ylabel="kNN top-1 (%)")
        bottom.axhline(1.0, color="grey", linestyle="--", label="chance, ln(K + 1)")
        bottom.set(title=f"pretext loss / ln(K + 1), {title}", xlabel="optimizer step",
                   ylabel=f"loss / chance (mean over {SMOOTH_STEPS} steps)")
        top.legend(fontsize=8)
        bottom.legend(fontsize=8)
    fig.suptitle("MoCo v2 recipe on Fashion-MNIST, 16 px, 6 epochs per job, one seed")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=Path, required=True, help="sweep folder of hparams_search=dictionary_size")
    parser.add_argument("--momentum", type=Path, required=True, help="sweep folder of hparams_search=momentum")
    parser.add_argument("--init-knn", type=float, default=None, help="kNN top-1 of the encoder at init (fraction)")
    parser.add_argument("--figure", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    size_jobs, momentum_jobs = read_sweep(args.size), read_sweep(args.momentum)
    # the m sweep's point at the K sweep's momentum is the K sweep's job at its queue size (same config and seed)
    swept_momenta = {job["momentum"] for job in momentum_jobs}
    queue_sizes = {job["queue_size"] for job in momentum_jobs}
    momentum_jobs = sorted(momentum_jobs + [job for job in size_jobs if job["queue_size"] in queue_sizes
                                            and job["momentum"] not in swept_momenta], key=lambda job: job["momentum"])
    print(f"{'sweep':<10} {'K':>7} {'m':>6} {'epochs':>6}  kNN top-1 per epoch (%)            loss / ln(K+1)")
    for name, jobs in (("K", size_jobs), ("m", momentum_jobs)):
        for job in jobs:
            knn = ", ".join(f"{100 * v:.1f}" for v in job["knn_top1"])
            ratio = job["final_loss"] / job["chance"] if job["final_loss"] is not None else float("nan")
            print(f"{name:<10} {job['queue_size']:>7} {job['momentum']:>6g} {job['epochs']:>6}  {knn:<34} {ratio:.3f}")
    figure(size_jobs, momentum_jobs, args.init_knn, args.figure)
    summary = {"init_knn_top1": args.init_knn, "smooth_steps": SMOOTH_STEPS,
               "jobs": [{k: v for k, v in job.items() if k not in ("loss", "acc_top1")}
                        for job in size_jobs + momentum_jobs]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"figure: {args.figure}\njson: {args.json}")


if __name__ == "__main__":
    main()
