"""``python eval_knn.py checkpoint=...`` / ``moco-eval-knn``: weighted kNN accuracy of a checkpoint's backbone.

Embeds the labelled train set (the memory bank; with ``label_fraction`` / ``label_subset_file`` that subset) and
the val set with the query backbone (``features=embedding``: the whole query encoder), prints kNN top-1 / top-5 and
writes ``<output_dir>/results.json``. The data is the checkpoint's pretraining data unless ``data=...`` is given
(:mod:`moco_lightning.cli.pretraining_data`).
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from moco_lightning.cli import CONFIG_PATH, report, resolve_device, run_or_exit
from moco_lightning.cli.labelled_subset import apply_labelled_subset
from moco_lightning.cli.pretraining_data import adopt_pretraining_data
from moco_lightning.data import DatasetError, DatasetNotAvailableError
from moco_lightning.eval.checkpoint import CheckpointError, load_backbone, load_query_encoder, read_backbone_checkpoint
from moco_lightning.eval.knn import FEATURES, knn_accuracy
from moco_lightning.eval.linear import prepare_labelled_data

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
    prepare_labelled_data(datamodule, "kNN evaluation")
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
    result = run_or_exit(evaluate_knn, cfg,
                         (CheckpointError, FileNotFoundError, DatasetError, DatasetNotAvailableError))
    report(cfg, result, f"kNN (k={cfg.k}, t={cfg.temperature}) on {result['dataset']}: "
           f"top-1 {100 * result['knn_top1']:.2f} %, top-5 {100 * result['knn_top5']:.2f} %")
    return result["knn_top1"]


def main() -> None:
    """Console entry point ``moco-eval-knn``."""
    _hydra_main()


if __name__ == "__main__":
    main()
