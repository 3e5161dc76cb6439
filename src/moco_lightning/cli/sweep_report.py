"""``moco-sweep-report <multirun folder>``: one table, one heatmap and one CSV for a Hydra sweep.

Reads every job of a ``python train.py -m ...`` sweep (``.hydra/overrides.yaml``, ``.hydra/config.yaml`` and the
final value of the metric in ``csv/metrics.csv``), prints the jobs sorted by the metric (the config's
``optimized_metric``, best first), saves ``sweep_heatmap.png`` (the metric over two swept keys, ``--x`` / ``--y``;
jobs that differ in other keys averaged per cell), ``sweep_report.csv`` and, with ``--curves METRIC[,METRIC]``,
``sweep_curves.png`` (one line per job). It names the jobs that failed (their ``error.txt``) or did not finish,
and the grid points of the sweep that have no job folder.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from moco_lightning.cli import RUN_ERROR_FILE

__all__ = ["Job", "SweepReport", "format_metric", "main", "metric_scale", "read_job", "read_sweep", "save_curves"]

DEFAULT_X, DEFAULT_Y = "model.momentum", "model.queue_size"
DEFAULT_METRIC = "val/knn_top1"


@dataclass
class Job:
    """One job of a sweep: its folder, overrides, final metric and status (done / unfinished / failed)."""

    folder: Path
    overrides: dict[str, str]
    metric: float | None = None
    epochs_done: int = 0
    max_epochs: int | None = None
    status: str = "done"
    reason: str = ""

    @property
    def name(self) -> str:
        """The job folder's name (Hydra's job number by default)."""
        return self.folder.name


@dataclass
class SweepReport:
    """The jobs of a sweep folder, the keys that vary between them, and the grid points without a folder."""

    folder: Path
    metric: str
    jobs: list[Job]
    swept: list[str]
    missing: list[dict[str, str]] = field(default_factory=list)

    def ranked(self) -> list[Job]:
        """Jobs sorted by the metric, best (largest) first; jobs without a value last."""
        return sorted(self.jobs, key=lambda j: (j.metric is None, -(j.metric or 0.0), _natural(j.name)))

    def problems(self) -> list[str]:
        """One line per job that failed or did not finish, and per grid point that has no job folder."""
        lines = [f"job {j.name} ({_describe(j.overrides, self.swept)}): {j.status}, {j.reason}"
                 for j in self.jobs if j.status != "done"]
        lines += [f"not started ({_describe(point, list(point))}): no job folder" for point in self.missing]
        return lines

    def table(self) -> str:
        """The ranked jobs as aligned text."""
        header = ["job", *self.swept, self.metric, "epochs", "status"]
        rows = [[j.name, *(j.overrides.get(k, "") for k in self.swept),
                 "-" if j.metric is None else format_metric(self.metric, j.metric),
                 f"{j.epochs_done}/{j.max_epochs if j.max_epochs is not None else '?'}", j.status]
                for j in self.ranked()]
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip()
                         for row in [header, *rows])

    def grid(self, x_key: str, y_key: str | None) -> tuple[Any, list[str], list[str], Any]:
        """``(values, x labels, y labels, counts)``: the mean final metric of the finished jobs per cell."""
        import numpy as np

        done = [j for j in self.jobs if j.status == "done" and j.metric is not None]
        xs = sorted({j.overrides.get(x_key, "") for j in self.jobs}, key=_natural)
        ys = sorted({j.overrides.get(y_key, "") for j in self.jobs}, key=_natural) if y_key else [""]
        total, counts = np.zeros((len(ys), len(xs))), np.zeros((len(ys), len(xs)))
        for j in done:
            row = ys.index(j.overrides.get(y_key, "")) if y_key else 0
            col = xs.index(j.overrides.get(x_key, ""))
            total[row, col] += j.metric
            counts[row, col] += 1
        with np.errstate(invalid="ignore"):
            values = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
        return values, xs, ys, counts

    def write_csv(self, path: Path) -> Path:
        """One row per job: name, status, swept keys, metric, epochs."""
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["job", "status", *self.swept, self.metric, "epochs_done", "max_epochs", "reason"])
            for j in self.ranked():
                writer.writerow([j.name, j.status, *(j.overrides.get(k, "") for k in self.swept),
                                 "" if j.metric is None else j.metric, j.epochs_done,
                                 "" if j.max_epochs is None else j.max_epochs, j.reason])
        return path


def metric_scale(metric: str) -> float:
    """100 for a metric logged as a fraction (an accuracy: "acc" or "top" in its last name part), else 1."""
    name = metric.rsplit("/", 1)[-1]
    return 100.0 if "acc" in name or "top" in name else 1.0


def format_metric(metric: str, value: float) -> str:
    """``value`` as the table shows it: accuracies in percent ("90.0 %"), anything else as it was logged."""
    return f"{100 * value:.1f} %" if metric_scale(metric) == 100.0 else f"{value:.4g}"


def read_job(folder: Path, metric: str | None = None) -> Job:
    """Read one job folder: overrides, config (max_epochs, optimized_metric), the metric's final value."""
    overrides = _parse_overrides(yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or [])
    config = _config(folder)
    metric = metric or config.get("optimized_metric") or DEFAULT_METRIC
    max_epochs = (config.get("trainer") or {}).get("max_epochs")
    max_epochs = int(max_epochs) if isinstance(max_epochs, int) and max_epochs > 0 else None
    job = Job(folder=folder, overrides=overrides, max_epochs=max_epochs)
    error_file = folder / RUN_ERROR_FILE
    error = error_file.read_text().strip() if error_file.is_file() else None
    metrics_csv = folder / "csv" / "metrics.csv"
    if not metrics_csv.is_file():
        job.status, job.reason = "unfinished", ("no csv/metrics.csv yet (still running, or killed before its first "
                                                "log), or no CSV logger")
        return _with_error(job, error)
    epochs_seen, value, value_epoch = -1, None, -1
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = _int(row.get("epoch"))
            epochs_seen = max(epochs_seen, epoch if epoch is not None else -1)
            cell = (row.get(metric) or "").strip()
            if cell:
                value, value_epoch = float(cell), epoch if epoch is not None else value_epoch
    job.epochs_done = max(value_epoch, epochs_seen) + 1
    job.metric = value
    if value is None:
        job.status, job.reason = "unfinished", f"no {metric} logged yet (still running, or killed before it)"
    elif job.max_epochs is not None and value_epoch + 1 < job.max_epochs:
        job.status = "unfinished"
        job.reason = f"last {metric} after epoch {value_epoch + 1} of {job.max_epochs}"
    elif value is not None and not math.isfinite(value):
        job.status, job.reason = "failed", f"{metric} is {value}"
    return _with_error(job, error)


def _with_error(job: Job, error: str | None) -> Job:
    """A job whose run folder holds the error it ended with is failed, with that error as the reason."""
    if error is not None:
        job.status, job.reason = "failed", f"{RUN_ERROR_FILE}: {error}"
    return job


def read_sweep(folder: str | Path, metric: str | None = None) -> SweepReport:
    """Read every job below a multirun folder (the folders holding ``.hydra/overrides.yaml``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass the folder of a sweep, multirun/<date>/<time>")
    job_dirs = sorted({p.parent.parent for p in folder.rglob(".hydra/overrides.yaml")},
                      key=lambda p: (str(p.parent), _natural(p.name)))
    if not job_dirs:
        raise FileNotFoundError(f"no job folders (with .hydra/overrides.yaml) under {folder}; is it the folder of a "
                                "`python train.py -m ...` sweep (multirun/<date>/<time>)?")
    jobs = [read_job(d, metric) for d in job_dirs]
    metric = metric or _config(job_dirs[0]).get("optimized_metric") or DEFAULT_METRIC
    keys = sorted({k for j in jobs for k in j.overrides})
    swept = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    grid_keys, points = _sweep_grid(folder / "multirun.yaml")
    swept += [k for k in grid_keys if k not in swept]
    found = {tuple(j.overrides.get(k) for k in grid_keys) for j in jobs}
    missing = [dict(zip(grid_keys, p)) for p in points if tuple(p) not in found]
    return SweepReport(folder=folder, metric=metric, jobs=jobs, swept=swept, missing=missing)


def report(folder: str | Path, x_key: str | None = None, y_key: str | None = None, metric: str | None = None,
           out: str | Path | None = None, curves: Sequence[str] = ()) -> tuple[SweepReport, Path | None, Path]:
    """Read a sweep, print its table and problems, save the heatmap (when a key varies), the CSV and the curves."""
    from moco_lightning.plots import save_figure, sweep_heatmap_figure

    sweep = read_sweep(folder, metric)
    out_dir = Path(out) if out else sweep.folder
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"{len(sweep.jobs)} jobs in {sweep.folder}, sorted by final {sweep.metric} (best first):")
    print(sweep.table())
    problems = sweep.problems()
    if problems:
        print(f"\n{len(problems)} job(s) failed or did not finish:")
        print("\n".join(f"  {line}" for line in problems))
    x_key, y_key = _heatmap_keys(sweep.swept, x_key, y_key)
    heatmap = None
    if x_key is not None:
        values, xs, ys, counts = sweep.grid(x_key, y_key)
        figure = sweep_heatmap_figure(values, xs, ys, x_key, y_key or "", sweep.metric, counts,
                                      scale=metric_scale(sweep.metric))
        heatmap = save_figure(figure, out_dir / "sweep_heatmap.png")
        print(f"\nheatmap: {heatmap}")
    else:
        print("\nno key varies between the jobs: no heatmap")
    table = sweep.write_csv(out_dir / "sweep_report.csv")
    print(f"table: {table}")
    if curves:
        print(f"curves: {save_curves(sweep, curves, out_dir / 'sweep_curves.png')}")
    return sweep, heatmap, table


def save_curves(sweep: SweepReport, metrics: Sequence[str], path: Path) -> Path:
    """Draw ``metrics`` over training for every job that logged them, one line per job; returns the PNG's path."""
    from moco_lightning.cli.plot import find_metrics_csv, read_metrics
    from moco_lightning.plots import save_figure, sweep_curves_figure

    runs = {}
    for job in sorted(sweep.jobs, key=lambda j: _natural(j.name)):
        try:
            series = read_metrics(find_metrics_csv(job.folder))
        except FileNotFoundError:
            continue
        runs[_describe(job.overrides, sweep.swept) if sweep.swept else job.name] = series
    return save_figure(sweep_curves_figure(runs, list(metrics), title=str(sweep.folder)), path)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``moco-sweep-report``."""
    parser = argparse.ArgumentParser(prog="moco-sweep-report",
                                     description="Table, heatmap and CSV of a Hydra sweep of train.py.")
    parser.add_argument("folder", help="the sweep folder: multirun/<date>/<time>")
    parser.add_argument("--x", help=f"swept key of the heatmap's columns (default {DEFAULT_X}, else the first one)")
    parser.add_argument("--y", help=f"swept key of the heatmap's rows (default {DEFAULT_Y}, else the second one)")
    parser.add_argument("--metric", help="metric column of csv/metrics.csv (default: the config's optimized_metric)")
    parser.add_argument("--out", help="folder of sweep_heatmap.png and sweep_report.csv (default: the sweep folder)")
    parser.add_argument("--curves", default="", help="comma-separated metrics to draw over training, one line per "
                        "job, into sweep_curves.png (e.g. train/acc_top1,val/knn_top1)")
    args = parser.parse_args(argv)
    try:
        report(args.folder, args.x, args.y, args.metric, args.out,
               [m.strip() for m in args.curves.split(",") if m.strip()])
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# -------------------------------------------------------------------------------------------------- helpers
def _heatmap_keys(swept: list[str], x_key: str | None, y_key: str | None) -> tuple[str | None, str | None]:
    for key, option in ((x_key, "--x"), (y_key, "--y")):
        if key is not None and key not in swept:
            raise ValueError(f"{option} {key}: not a swept key of this sweep; choose one of {', '.join(swept) or '-'}")
    if x_key is None and y_key is None and DEFAULT_X in swept and DEFAULT_Y in swept:
        return DEFAULT_X, DEFAULT_Y
    rest = [k for k in swept if k not in (x_key, y_key)]
    x_key = x_key or (rest.pop(0) if rest else None)
    y_key = y_key or (rest.pop(0) if rest else None)
    if x_key is None and y_key is not None:
        x_key, y_key = y_key, None
    return x_key, y_key


def _parse_overrides(lines: Sequence[str]) -> dict[str, str]:
    """``["model.momentum=0.99", "+x=1", "~callbacks.knn"]`` -> ``{"model.momentum": "0.99", "x": "1", ...}``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = {}
    for override in OverridesParser.create().parse_overrides([str(line) for line in lines]):
        value = "(deleted)" if override.is_delete() else override.get_value_element_as_str()
        parsed[override.key_or_group] = value
    return parsed


def _sweep_grid(multirun_yaml: Path) -> tuple[list[str], list[tuple[str, ...]]]:
    """The keys and points of a basic-sweeper grid (command line and ``hydra.sweeper.params``), else nothing."""
    if not multirun_yaml.is_file():
        return [], []
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hydra_cfg = (yaml.safe_load(multirun_yaml.read_text()) or {}).get("hydra") or {}
    sweeper = hydra_cfg.get("sweeper") or {}
    if "BasicSweeper" not in str(sweeper.get("_target_", "")):
        return [], []  # Optuna & co choose their points as they go: no grid to compare with
    lines = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    lines += list((hydra_cfg.get("overrides") or {}).get("task") or [])
    axes: dict[str, list[str]] = {}
    try:
        for override in OverridesParser.create().parse_overrides(lines):
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    return [], []
                axes[override.key_or_group] = list(override.sweep_string_iterator())
    except Exception:  # noqa: BLE001 - an unparsable sweep only loses the "not started" check
        return [], []
    keys = list(axes)
    return keys, [tuple(p) for p in itertools.product(*axes.values())]


def _config(job_dir: Path) -> dict[str, Any]:
    """The job's composed config (``.hydra/config.yaml``), ``{}`` where there is none."""
    config_file = job_dir / ".hydra" / "config.yaml"
    return (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else {}


def _describe(overrides: dict[str, str], keys: Sequence[str]) -> str:
    return " ".join(f"{k}={overrides[k]}" for k in keys if k in overrides) or "no overrides"


def _natural(text: str) -> tuple[int, float, str]:
    """Sort numbers by value and everything else by text, numbers first."""
    try:
        return (0, float(text), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(text))


def _int(text: str | None) -> int | None:
    try:
        return int(float(text)) if text not in (None, "") else None
    except ValueError:
        return None


if __name__ == "__main__":
    main()
