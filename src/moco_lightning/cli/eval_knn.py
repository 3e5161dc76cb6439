"""``python eval_knn.py checkpoint=...`` / ``moco-eval-knn``: weighted kNN accuracy of a checkpoint's backbone.

Loads the query backbone of a pretraining checkpoint (:func:`moco_lightning.eval.load_backbone`; with
``features=embedding`` the whole query encoder, :func:`moco_lightning.eval.load_query_encoder`), embeds the
datamodule's labelled train set (memory bank) and val set (queries), prints kNN top-1 / top-5 (k=200, t=0.1 by
default) and writes them to ``<output_dir>/results.json``. Without ``data=...`` on the command line the data is the
checkpoint's pretraining data (:mod:`moco_lightning.cli.pretraining_data`); one line says which. With
``label_fraction`` (or ``label_subset_file``) the memory bank is that labelled subset of the training images
(:mod:`moco_lightning.cli.labelled_subset`).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moco_lightning.cli import CONFIG_PATH, resolve_device, write_results
from moco_lightning.cli.labelled_subset import apply_labelled_subset
from moco_lightning.cli.pretraining_data import adopt_pretraining_data
from moco_lightning.data import DatasetError, DatasetNotAvailableError
from moco_lightning.eval.checkpoint import CheckpointError, load_backbone, load_query_encoder, read_backbone_checkpoint
from moco_lightning.eval.knn import FEATURES, knn_accuracy

__all__ = ["evaluate_knn", "main"]

log = logging.getLogger(__name__)


def evaluate_knn(cfg: DictConfig) -> dict[str, Any]:
    """Run the kNN evaluation a config describes; returns the result dict that is also saved as JSON."""
    L.seed_everything(cfg.seed)
    if cfg.features not in FEATURES:
        raise CheckpointError(f"features={cfg.features} is not one of {', '.join(FEATURES)}")
    load = load_backbone if cfg.features == "backbone" else load_query_encoder
    backbone, dim, ckpt = load(read_backbone_checkpoint(cfg.checkpoint, allow_pickle=cfg.allow_pickle))
    adopt_pretraining_data(cfg)
    device = resolve_device(cfg.device)
    backbone.to(device).eval()
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if hasattr(datamodule, "require_labels"):
        datamodule.require_labels("kNN evaluation")
    labels = apply_labelled_subset(cfg, datamodule)  # the memory bank: the labelled images only
    result = knn_accuracy(
        backbone,
        datamodule.eval_train_dataloader(),
        datamodule.eval_val_dataloader(),
        num_classes=getattr(datamodule, "num_classes", None) or None,
        k=cfg.k,
        temperature=cfg.temperature,
        device=device,
        bank_dtype=cfg.bank_dtype,
        chunk_size=cfg.chunk_size,
        bank_chunk_size=cfg.bank_chunk_size,
    )
    return {
        "checkpoint": ckpt.path,
        "backbone": ckpt.backbone,
        "features": cfg.features,
        "feature_dim": dim,
        "dataset": type(datamodule).__name__,
        "k": cfg.k,
        "temperature": cfg.temperature,
        "knn_top1": result["top1"],
        "knn_top5": result["top5"],
        **labels,
    }


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_knn")
def _hydra_main(cfg: DictConfig) -> float:
    try:
        result = evaluate_knn(cfg)
    except (CheckpointError, FileNotFoundError, DatasetError, DatasetNotAvailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(
        f"kNN (k={cfg.k}, t={cfg.temperature}) on {result['dataset']}: "
        f"top-1 {100 * result['knn_top1']:.2f} %, top-5 {100 * result['knn_top5']:.2f} %",
        flush=True,
    )
    write_results(result, OmegaConf.select(cfg, "paths.output_dir"))
    return result["knn_top1"]


def main() -> None:
    """Console entry point ``moco-eval-knn``."""
    _hydra_main()


if __name__ == "__main__":
    main()
