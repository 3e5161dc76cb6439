"""``python eval_linear.py linear_protocol=features checkpoint=...``: the linear probe that fits a CPU budget.

Loads the query backbone of a checkpoint (or none with ``checkpoint=pixels``), embeds the datamodule's un-augmented
training and evaluation images once, and fits a logistic regression by L-BFGS with the L2 strength chosen on
held-out training features (:mod:`moco_lightning.eval.linear_features`). ``moco-eval-linear`` dispatches here when
``cfg.protocol`` is ``features``; the official protocols do not pass through this module.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from moco_lightning.cli import resolve_device
from moco_lightning.cli.config_checks import ConfigError
from moco_lightning.cli.labelled_subset import apply_labelled_subset
from moco_lightning.cli.pretraining_data import adopt_pretraining_data
from moco_lightning.eval.checkpoint import load_backbone, read_backbone_checkpoint
from moco_lightning.eval.linear_features import feature_probe

__all__ = ["PIXELS", "check_features_config", "evaluate_features", "summary"]

log = logging.getLogger(__name__)

#: The ``checkpoint`` value that means "no encoder": the probe reads the flattened pixels of the evaluation view.
PIXELS = "pixels"
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def check_features_config(cfg: DictConfig) -> None:
    """Fail in one line on a bad setting of the features protocol, before any data is read."""
    grid = list(cfg.l2_grid)
    if not grid or any(not isinstance(v, int | float) or v < 0 for v in grid):
        raise ConfigError(f"l2_grid={grid} must be a non-empty list of L2 strengths >= 0, e.g. l2_grid=[1e-4,1e-2]")
    if len(grid) > 1 and not 0.0 < float(cfg.holdout_fraction) < 1.0:
        raise ConfigError(f"holdout_fraction={cfg.holdout_fraction} must be in (0, 1), e.g. holdout_fraction=0.2")
    if cfg.dtype not in _DTYPES:
        raise ConfigError(f"dtype={cfg.dtype} is not one of {', '.join(_DTYPES)}; set dtype=float32")
    if cfg.patience is not None and int(cfg.patience) < 1:
        raise ConfigError(f"patience={cfg.patience} must be a positive integer, or null to fit the whole l2_grid")
    if int(cfg.max_iter) < 1 or int(cfg.batch_size) < 1:
        raise ConfigError(f"max_iter={cfg.max_iter} and batch_size={cfg.batch_size} must be positive integers")


def evaluate_features(cfg: DictConfig) -> dict[str, Any]:
    """Run the features protocol a config describes; returns the result dict that is also saved as JSON."""
    check_features_config(cfg)
    L.seed_everything(cfg.seed)
    pixels = str(cfg.checkpoint) == PIXELS
    device = resolve_device(cfg.device)
    if pixels:
        backbone, dim, path, name = None, None, PIXELS, None
    else:
        # fails on a bad file before any data is read
        backbone, dim, ckpt = load_backbone(read_backbone_checkpoint(cfg.checkpoint, allow_pickle=cfg.allow_pickle))
        backbone.to(device).eval()
        path, name = ckpt.path, ckpt.backbone
        adopt_pretraining_data(cfg)  # the checkpoint's pretraining data unless data=... is on the command line
    cfg.data.eval_batch_size = int(cfg.batch_size)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    labels = apply_labelled_subset(cfg, datamodule)  # the probe's training images: the labelled ones only
    result = feature_probe(backbone, datamodule, module=backbone, device=None if pixels else device,
                           l2_grid=[float(v) for v in cfg.l2_grid], holdout_fraction=float(cfg.holdout_fraction),
                           seed=int(cfg.seed), max_iter=int(cfg.max_iter), tolerance=float(cfg.tolerance),
                           dtype=_DTYPES[cfg.dtype], patience=None if cfg.patience is None else int(cfg.patience))
    if not result.converged:
        log.warning("L-BFGS stopped at max_iter=%d before its tolerance; raise max_iter for a converged fit",
                    cfg.max_iter)
    out = result.as_dict()
    return {
        "protocol": "features",
        "checkpoint": path,
        "backbone": name,
        "dataset": type(datamodule).__name__,
        "feature_dim": dim if dim is not None else out["feature_dim"],
        "linear_top1": out.pop("top1"),
        "linear_top5": out.pop("top5"),
        **{k: v for k, v in out.items() if k != "feature_dim"},
        **labels,
    }


def summary(result: dict[str, Any]) -> str:
    """The line the CLI prints for a features-protocol result."""
    what = "raw pixels" if result["checkpoint"] == PIXELS else f"{result['backbone'] or 'backbone'} features"
    return (f"linear probe (L-BFGS on frozen {what}, {result['feature_dim']} dims, l2 {result['l2']:g}) on "
            f"{result['dataset']}: top-1 {100 * result['linear_top1']:.2f} %, top-5 {100 * result['linear_top5']:.2f} "
            f"% ({result['num_train']} train / {result['num_eval']} eval images, {result['seconds']['total']:.1f} s)")
