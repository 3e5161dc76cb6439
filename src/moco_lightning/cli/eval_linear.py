"""``python eval_linear.py checkpoint=...`` / ``moco-eval-linear``: linear evaluation, official MoCo protocols.

``linear_protocol=moco`` (default) is the v1/v2 protocol, ``mocov3`` the v3 one, ``features`` a CPU-budget probe
(L-BFGS on frozen features, :mod:`moco_lightning.cli.eval_linear_features`). Trains
:class:`~moco_lightning.eval.linear.LinearProbe` on the frozen query backbone with ``conf/trainer`` and
``conf/logger``, prints and saves (``results.json``) the last epoch's top-1 / top-5 and the best epoch's top-1
(epochs counted from 1). ``batch_size`` is the protocol's global batch, split over the processes. The data is the
checkpoint's pretraining data unless ``data=...`` is given (:mod:`moco_lightning.cli.pretraining_data`).
"""

from __future__ import annotations

from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from moco_lightning.cli import CONFIG_PATH, count_processes, report, run_or_exit, share_cpus
from moco_lightning.cli.config_checks import ConfigError
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
    if str(cfg.checkpoint) == PIXELS:
        raise ConfigError("checkpoint=pixels (no encoder) works only with linear_protocol=features")
    L.seed_everything(cfg.seed)
    # fail on a bad file before building anything
    ckpt = read_backbone_checkpoint(cfg.checkpoint, allow_pickle=cfg.allow_pickle)
    adopt_pretraining_data(cfg)  # the checkpoint's pretraining data unless data=... is on the command line
    cfg.data.eval_batch_size = per_device_batch(cfg)
    datamodule = instantiate(cfg.data)
    labels = apply_labelled_subset(cfg, datamodule)  # the probe's training images: the labelled ones only
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]
    trainer = instantiate(cfg.trainer, logger=loggers or False, enable_checkpointing=False)
    share_cpus(datamodule, trainer)
    options = ("lr", "scale_lr", "momentum", "weight_decay", "schedule", "gamma", "augment_train", "sanity_check")
    result = linear_eval(ckpt, datamodule, epochs=cfg.trainer.max_epochs, milestones=list(cfg.milestones),
                         trainer=trainer, **{key: cfg[key] for key in options})
    return {
        "checkpoint": ckpt.path, "backbone": ckpt.backbone, "dataset": type(datamodule).__name__,
        "epochs": cfg.trainer.max_epochs, "global_batch": cfg.batch_size, "linear_top1": result["top1"],
        "linear_top5": result["top5"], "linear_best_top1": result["best_top1"],
        "best_epoch": result["best_epoch"] + 1,  # counted from 1, as printed
        **labels,
    }, trainer


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_linear")
def _hydra_main(cfg: DictConfig) -> float:
    errors = (CheckpointError, ConfigError, FileNotFoundError, DatasetError)
    if cfg.get("protocol") == "features":  # the CPU-budget probe on frozen features (conf/linear_protocol/features)
        result = run_or_exit(evaluate_features, cfg, errors)
        report(cfg, result, summary(result))
        return result["linear_top1"]
    result, trainer = run_or_exit(evaluate_linear, cfg, errors)
    if trainer.is_global_zero:
        report(cfg, result,
               f"linear evaluation on {result['dataset']} ({result['epochs']} epochs, batch {result['global_batch']}): "
               f"last epoch top-1 {100 * result['linear_top1']:.2f} %, top-5 {100 * result['linear_top5']:.2f} %; "
               f"best top-1 {100 * result['linear_best_top1']:.2f} % (epoch {result['best_epoch']})")
    return result["linear_top1"]


def main() -> None:
    """Console entry point ``moco-eval-linear``."""
    _hydra_main()


if __name__ == "__main__":
    main()
