"""The table of issue 28's few-label measurement, from the run folders of ``few_labels_fashion_mnist.sh``.

Reads ``<out>/<run>/results.json`` of the fine-tuning, kNN and features-probe runs and prints one markdown row per
run (top-1, labelled images, epochs, wall time), then writes them all to ``<out>/few_labels.json``.

    python benchmarks/few_labels_table.py <out folder>
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def rows(out: Path) -> list[dict]:
    """One dict per run folder that holds a results.json, in name order."""
    found = []
    for path in sorted(out.glob("*/results.json")):
        result = json.loads(path.read_text())
        kind = ("fine-tuning" if "finetune_top1" in result else "kNN" if "knn_top1" in result
                else "features probe")
        top1 = result.get("finetune_top1", result.get("knn_top1", result.get("linear_top1")))
        found.append({"run": path.parent.name, "kind": kind, "checkpoint": result.get("checkpoint"),
                      "label_fraction": result.get("label_fraction"), "label_seed": result.get("label_seed"),
                      "labelled_images": result.get("labelled_images"), "epochs": result.get("epochs"),
                      "top1": top1, "best_top1": result.get("finetune_best_top1"),
                      "wall_time_s": result.get("wall_time_s", (result.get("seconds") or {}).get("total"))})
    return found


def main() -> None:
    """Print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder of the run folders")
    args = parser.parse_args()
    table = rows(args.out)
    print("| run | kind | labels | seed | epochs | top-1 | wall |\n|---|---|---|---|---|---|---|")
    for r in table:
        wall = f"{r['wall_time_s']:.0f} s" if r["wall_time_s"] is not None else "-"
        print(f"| {r['run']} | {r['kind']} | {r['labelled_images']} ({100 * r['label_fraction']:g} %) | "
              f"{r['label_seed']} | {r['epochs'] or '-'} | {100 * r['top1']:.2f} | {wall} |")
    (args.out / "few_labels.json").write_text(json.dumps(table, indent=2) + "\n")
    print(f"written: {args.out / 'few_labels.json'}")


if __name__ == "__main__":
    main()
