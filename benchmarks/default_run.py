"""Wall time of the default run (`python train.py`) at an older commit and at this checkout, side by side.

The older commit is exported with `git archive` into a throwaway folder (the checkout is not touched) and run with
the same Python and the same thread count; the two variants alternate (old, new, old, new, ...) so that both see
the same load of a shared machine. Every run's wall time, its kNN table and the load average before and after it
are printed and written to JSON. Not a test.

    python benchmarks/default_run.py --old b4a61d4 --repeats 2 --threads 2
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_output_arguments, output_path, write_results

ROOT = Path(__file__).resolve().parents[1]
KNN_ROW = re.compile(r"^\s+(raw pixels|encoder at init|trained encoder)\s+([\d.]+) %", re.MULTILINE)


def export_commit(commit: str, folder: Path) -> Path:
    """A copy of ``commit``'s files in ``folder`` whose package finds its own configs (not this checkout's)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    link = folder / "src" / "moco_lightning" / "conf"
    if not link.exists():
        link.symlink_to(folder / "conf", target_is_directory=True)
    return folder


def environment(src: Path, threads: int) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                WANDB_MODE="offline", WANDB_SILENT="true", PYTHONWARNINGS="ignore")


def config_path(src: Path, threads: int) -> str:
    code = "from moco_lightning.cli import CONFIG_PATH; print(CONFIG_PATH)"
    out = subprocess.run([sys.executable, "-c", code], env=environment(src, threads), capture_output=True,
                         text=True, check=True)
    return out.stdout.strip()


def run_once(name: str, checkout: Path, out_dir: Path, threads: int, extra: list[str]) -> dict:
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(checkout / "train.py"), f"hydra.run.dir={out_dir}",
                             "callbacks.progress_bar.refresh_rate=0", *extra],
                            cwd=out_dir.parent, env=environment(checkout / "src", threads), capture_output=True,
                            text=True)
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    knn = {row: float(value) for row, value in KNN_ROW.findall(result.stdout)}
    return {"variant": name, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "knn_top1": knn,
            "loadavg_before": [round(v, 2) for v in load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="b4a61d4", help="the commit to compare with")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each variant, alternating")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every run")
    parser.add_argument("--work", default=None, help="folder for the exported commit and the run outputs")
    add_output_arguments(parser, "default_run.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for both variants (e.g. trainer.max_epochs=2)")
    args = parser.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="default_run_"))
    old = export_commit(args.old, work / f"old-{args.old}")
    variants = {f"old {args.old}": old, "new (this checkout)": ROOT}
    for name, checkout in variants.items():
        configs = config_path(checkout / "src", args.threads)
        if not configs.startswith(str(checkout)):
            raise RuntimeError(f"{name} would read the configs of {configs}, not its own")

    runs = []
    for repeat in range(args.repeats):
        for i, (name, checkout) in enumerate(variants.items()):
            out_dir = work / f"run{repeat}-{i}"
            run = run_once(name, checkout, out_dir, args.threads, args.overrides)
            runs.append(run)
            print(f"{run['variant']:<22} {run['seconds']:>7.1f} s ({run['cpu_seconds']:.1f} s CPU)  kNN "
                  f"{run['knn_top1']}  load "
                  f"{run['loadavg_before'][0]:.1f} -> {run['loadavg_after'][0]:.1f}", flush=True)

    summary = {}
    for name in variants:
        times = [r["seconds"] for r in runs if r["variant"] == name]
        cpu = [r["cpu_seconds"] for r in runs if r["variant"] == name]
        summary[name] = {"seconds": times, "best": min(times), "mean": round(sum(times) / len(times), 1),
                         "cpu_seconds": cpu, "cpu_mean": round(sum(cpu) / len(cpu), 1)}
    names = list(variants)
    speedup_best = summary[names[0]]["best"] / summary[names[1]]["best"]
    speedup_mean = summary[names[0]]["mean"] / summary[names[1]]["mean"]
    print(f"\n{'variant':<22} {'runs (s)':<24} {'best':>7} {'mean':>7}")
    for name, s in summary.items():
        print(f"{name:<22} {', '.join(f'{t:.1f}' for t in s['seconds']):<24} {s['best']:>7.1f} {s['mean']:>7.1f}")
    speedup_cpu = summary[names[0]]["cpu_mean"] / summary[names[1]]["cpu_mean"]
    print(f"speed-up old/new: {speedup_best:.2f}x (best runs), {speedup_mean:.2f}x (means), "
          f"{speedup_cpu:.2f}x (mean CPU time)")

    payload = {"benchmark": "default_run", "old_commit": args.old, "threads": args.threads,
               "overrides": args.overrides, "runs": runs, "summary": summary,
               "speedup_best": round(speedup_best, 3), "speedup_mean": round(speedup_mean, 3),
               "speedup_cpu_time": round(speedup_cpu, 3),
               "command": " ".join(["python benchmarks/default_run.py", f"--old {args.old}",
                                    f"--repeats {args.repeats}", f"--threads {args.threads}", *args.overrides])}
    write_results(payload, output_path(args, "default_run.json"))


if __name__ == "__main__":
    main()
