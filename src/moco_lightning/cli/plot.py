"""``moco-plot <run folder>``: the training curves of a run as one PNG, from its ``csv/metrics.csv``.

Panels (those with data): InfoNCE loss, kNN top-1, learning rate, key-encoder momentum, key-encoder drift, key
ages of the queue, similarities of queries to their positive and negatives, alignment / uniformity
(:data:`moco_lightning.plots.CURVE_PANELS`). Writes ``<run folder>/training_curves.png`` unless ``--out`` says
otherwise, and prints the path.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["find_metrics_csv", "main", "plot_run", "read_metrics"]

#: Columns of Lightning's CSVLogger that are coordinates, not metrics.
_COORDINATES = ("step", "epoch")


def find_metrics_csv(run_dir: str | Path) -> Path:
    """``<run_dir>/csv/metrics.csv`` (the CSV logger of the configs), else the only ``metrics.csv`` below it."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name == "metrics.csv":
        return run_dir
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder; pass the output folder of a run "
                                "(outputs/<date>/<time> or one job of multirun/<date>/<time>)")
    default = run_dir / "csv" / "metrics.csv"
    if default.is_file():
        return default
    found = sorted(run_dir.rglob("metrics.csv"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"no metrics.csv under {run_dir}: the run had no CSV logger (use logger=csv or "
                                "logger=many) or did not log a step yet")
    raise FileNotFoundError(f"{len(found)} metrics.csv files under {run_dir} ({found[0]}, ...): pass one of them")


def read_metrics(path: str | Path) -> dict[str, tuple[list[float], list[float]]]:
    """Every metric column of a Lightning ``metrics.csv``: name -> ``(steps, values)``, empty cells skipped."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            step = _number(row.get("step"))
            for name, cell in row.items():
                value = _number(cell)
                if name in _COORDINATES or name is None or value is None:
                    continue
                steps, values = series.setdefault(name, ([], []))
                steps.append(step if step is not None else float(len(steps)))
                values.append(value)
    return series


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the training curves of the run in ``run_dir``; returns the path of the PNG."""
    from moco_lightning.plots import save_figure, training_curves_figure

    metrics_csv = find_metrics_csv(run_dir)
    run_folder = Path(run_dir) if Path(run_dir).is_dir() else metrics_csv.parent
    figure = training_curves_figure(read_metrics(metrics_csv), title=str(run_folder))
    return save_figure(figure, Path(out) if out else run_folder / "training_curves.png")


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point ``moco-plot``."""
    parser = argparse.ArgumentParser(prog="moco-plot", description=__doc__.splitlines()[0].split(": ", 1)[-1])
    parser.add_argument("run", help="the output folder of a run (holds csv/metrics.csv) or a metrics.csv file")
    parser.add_argument("--out", help="where to write the PNG (default: <run>/training_curves.png)")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.run, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"training curves: {path}")


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)  # nan / inf kept: a diverging run shows as a gap, not as a healthy curve
    except ValueError:
        return None


if __name__ == "__main__":
    main()
