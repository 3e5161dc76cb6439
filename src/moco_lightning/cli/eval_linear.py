"""``python eval_linear.py checkpoint=...`` / ``moco-eval-linear``: linear evaluation, official MoCo protocols.

``linear_protocol=moco`` (default) is the v1/v2 protocol, ``linear_protocol=mocov3`` the v3 one (conf/linear_protocol/).
``linear_protocol=features`` is not an official protocol but a probe that fits a CPU budget (logistic regression on
frozen features by L-BFGS, :mod:`moco_lightning.cli.eval_linear_features`).

Loads the query backbone of a pretraining checkpoint, freezes it in eval mode, trains a new linear classifier
(:class:`moco_lightning.eval.linear.LinearProbe`) with the Trainer of ``conf/trainer`` and the loggers of
``conf/logger``, checks after the first epoch that the backbone still equals the checkpoint, and prints and saves
(``<output_dir>/results.json``) validation top-1 / top-5 of the last epoch and the best epoch's top-1 (the number
the official script reports; epochs counted from 1 in both). Without ``data=...`` on the command line the data is
the checkpoint's pretraining data (:mod:`moco_lightning.cli.pretraining_data`). ``batch_size`` is the protocol's
global batch: the per-device batch is ``batch_size / processes``, so the lr of the protocol holds on any number of
devices.
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moco_lightning.cli import CONFIG_PATH, write_results
from moco_lightning.cli.config_checks import ConfigError, count_processes
from moco_lightning.cli.eval_linear_features import PIXELS, evaluate_features, summary
from moco_lightning.cli.labelled_subset import apply_labelled_subset
from moco_lightning.cli.pretraining_data import adopt_pretraining_data
from moco_lightning.data import DatasetError
from moco_lightning.eval.checkpoint import CheckpointError, read_backbone_checkpoint
from moco_lightning.eval.linear import linear_eval

__all__ = ["evaluate_linear", "main", "per_device_batch"]


def per_device_batch(cfg: DictConfig) -> int:
    """The probe's per-device batch: the protocol's global ``batch_size`` over the run's processes."""
    processes = count_processes(cfg.trainer) or 1
    if cfg.batch_size % processes != 0:
        raise ConfigError(
            f"batch_size={cfg.batch_size} (the protocol's global batch) is not divisible by the {processes} processes "
            "of trainer.devices x trainer.num_nodes; use a device count that divides it, or change batch_size"
        )
    return cfg.batch_size // processes


def evaluate_linear(cfg: DictConfig) -> tuple[dict[str, Any], L.Trainer]:
    """Run the linear evaluation a config describes; returns the result dict and the Trainer."""
    L.seed_everything(cfg.seed)
    # fail on a bad file before building anything
    ckpt = read_backbone_checkpoint(cfg.checkpoint, allow_pickle=cfg.allow_pickle)
    adopt_pretraining_data(cfg)  # the checkpoint's pretraining data unless data=... is on the command line
    cfg.data.eval_batch_size = per_device_batch(cfg)
    datamodule = instantiate(cfg.data)
    labels = apply_labelled_subset(cfg, datamodule)  # the probe's training images: the labelled ones only
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]
    trainer = instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False)
    result = linear_eval(
        ckpt,
        datamodule,
        epochs=cfg.trainer.max_epochs,
        lr=cfg.lr,
        scale_lr=cfg.scale_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        schedule=cfg.schedule,
        milestones=list(cfg.milestones),
        gamma=cfg.gamma,
        augment_train=cfg.augment_train,
        sanity_check=cfg.sanity_check,
        trainer=trainer,
    )
    return {
        "checkpoint": ckpt.path,
        "backbone": ckpt.backbone,
        "dataset": type(datamodule).__name__,
        "epochs": cfg.trainer.max_epochs,
        "global_batch": cfg.batch_size,
        "linear_top1": result["top1"],
        "linear_top5": result["top5"],
        "linear_best_top1": result["best_top1"],
        "best_epoch": result["best_epoch"] + 1,  # counted from 1, as printed
        **labels,
    }, trainer


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_linear")
def _hydra_main(cfg: DictConfig) -> float:
    if cfg.get("protocol") == "features":  # the CPU-budget probe on frozen features (conf/linear_protocol/features)
        return _features_main(cfg)
    try:
        if str(cfg.checkpoint) == PIXELS:
            raise ConfigError("checkpoint=pixels (no encoder) works only with linear_protocol=features")
        result, trainer = evaluate_linear(cfg)
    except (CheckpointError, ConfigError, FileNotFoundError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    if trainer.is_global_zero:
        print(
            f"linear evaluation on {result['dataset']} ({result['epochs']} epochs, batch {result['global_batch']}): "
            f"last epoch top-1 {100 * result['linear_top1']:.2f} %, top-5 {100 * result['linear_top5']:.2f} %; "
            f"best top-1 {100 * result['linear_best_top1']:.2f} % (epoch {result['best_epoch']})",
            flush=True,
        )
        write_results(result, OmegaConf.select(cfg, "paths.output_dir"))
    return result["linear_top1"]


def _features_main(cfg: DictConfig) -> float:
    try:
        result = evaluate_features(cfg)
    except (CheckpointError, ConfigError, FileNotFoundError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(summary(result), flush=True)
    write_results(result, OmegaConf.select(cfg, "paths.output_dir"))
    return result["linear_top1"]


def main() -> None:
    """Console entry point ``moco-eval-linear``."""
    _hydra_main()


if __name__ == "__main__":
    main()
