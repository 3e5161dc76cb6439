"""``label_fraction`` / ``label_seed`` / ``label_subset_file`` of the evaluation entry points (few labels).

kNN (``eval_knn.py``), the linear probes (``eval_linear.py``) and fine-tuning (``eval_finetune.py``) take the same
three settings; :func:`apply_labelled_subset` restricts the datamodule's labelled training images to them
(:mod:`moco_lightning.data.labels`) and writes the indices into the run folder, so that another run can use the
same labels (``label_subset_file=<run folder>/labelled_indices.txt``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from moco_lightning.data import DatasetError
from moco_lightning.data.labels import choose_labelled_subset, write_subset_file

__all__ = ["SUBSET_FILE", "apply_labelled_subset"]

log = logging.getLogger(__name__)

#: The file in the run folder that lists the labelled training images used, one index a line.
SUBSET_FILE = "labelled_indices.txt"


def apply_labelled_subset(cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """Restrict ``datamodule``'s labelled training images to the config's subset; returns what was used.

    Returns ``{"label_fraction", "label_seed", "label_subset_file", "labelled_images", "train_images"}``
    (``labelled_images`` equals ``train_images`` when every label is used). ``DatasetError`` (one line naming the
    setting): a fraction out of (0, 1], a subset file that cannot be read or does not fit the data.
    """
    fraction = float(cfg.get("label_fraction", 1.0))
    seed = int(cfg.get("label_seed", 0))
    subset_file = cfg.get("label_subset_file")
    datamodule.prepare_data()
    dataset = datamodule.labelled_train_dataset()
    try:
        indices = choose_labelled_subset(dataset, fraction, seed, subset_file)
    except ValueError as err:
        message = str(err)
        raise DatasetError(f"label_{message}" if message.startswith(("fraction=", "subset_file=")) else message
                           ) from None
    total = len(dataset)
    used = {"label_fraction": fraction, "label_seed": seed, "label_subset_file": subset_file,
            "labelled_images": total if indices is None else len(indices), "train_images": total}
    if indices is None:
        return used
    datamodule.use_labelled_subset(indices)
    where = ""
    output_dir = OmegaConf.select(cfg, "paths.output_dir")
    if output_dir:
        path = write_subset_file(indices, Path(output_dir) / SUBSET_FILE, label_fraction=fraction, label_seed=seed,
                                 label_subset_file=subset_file, train_images=total)
        where = f"; their indices: {path}"
    log.info("labels: %d of the %d training images (%.1f %%, %s)%s", len(indices), total, 100 * len(indices) / total,
             f"from {subset_file}" if subset_file else f"class-balanced, label_seed={seed}", where)
    return used
