"""``python eval_finetune.py checkpoint=...`` / ``moco-finetune``: fine-tune a pretrained backbone with few labels.

Trains the query backbone (``checkpoint=none``: the ``backbone`` group's network at random initialisation, the
supervised baseline) and a new classifier (:class:`~moco_lightning.eval.finetune.FineTuner`, recipe
``conf/finetune_recipe``) on ``label_fraction`` of the labels (:mod:`moco_lightning.cli.labelled_subset`).
Checkpoints ``last.ckpt`` / ``best.ckpt`` (``ckpt_path=auto`` resumes); at the end one line with the last and best
top-1, the exported classifier and ``results.json``. The data is the checkpoint's pretraining data unless
``data=...`` is given (:mod:`moco_lightning.cli.pretraining_data`).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from moco_lightning.backbones import build_backbone
from moco_lightning.checkpointing import (
    ResumeError,
    ResumeState,
    check_checkpoint_matches,
    continue_loggers,
    read_training_checkpoint,
)
from moco_lightning.cli import CONFIG_PATH, report, run_or_exit, share_cpus
from moco_lightning.cli.config_checks import ConfigError, exit_on_bad_command_line
from moco_lightning.cli.eval_linear import per_device_batch
from moco_lightning.cli.labelled_subset import apply_labelled_subset
from moco_lightning.cli.pretraining_data import adopt_pretraining_data
from moco_lightning.data import DatasetError
from moco_lightning.eval.checkpoint import CheckpointError, load_backbone, read_backbone_checkpoint
from moco_lightning.eval.finetune import (
    FineTuner,
    check_finetune_args,
    export_classifier,
    prepare_labelled_data,
    resnet_arch,
    train_finetuner,
)
from moco_lightning.optim import scaled_lr

__all__ = ["RANDOM_INIT", "finetune_from_config", "main", "summary"]

log = logging.getLogger(__name__)

#: ``checkpoint=none``: no pretraining, the ``backbone`` group's network at random initialisation.
RANDOM_INIT = "none"
#: The errors a user can cause: one line ``error: ...`` and exit status 2.
USER_ERRORS = (CheckpointError, ConfigError, DatasetError, FileNotFoundError, ResumeError)


def finetune_from_config(cfg: DictConfig) -> tuple[dict[str, Any], L.Trainer]:
    """Run the fine-tuning a config describes; returns the result dict (as saved in results.json) and the Trainer."""
    start = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    recipe = _recipe(cfg)
    pretrained = _pretrained(cfg)
    ckpt = None
    if pretrained:  # fail on a bad file before anything is built
        ckpt = read_backbone_checkpoint(cfg.checkpoint, allow_pickle=cfg.allow_pickle)
        _check_backbone_not_given(cfg, ckpt.backbone)
        adopt_pretraining_data(cfg)  # the checkpoint's pretraining data unless data=... is on the command line
    cfg.data.eval_batch_size = per_device_batch(cfg)
    datamodule = instantiate(cfg.data)
    labels = apply_labelled_subset(cfg, datamodule)  # the training images: the labelled ones only
    num_classes = prepare_labelled_data(datamodule)
    if not num_classes:
        raise ConfigError(f"data: {type(datamodule).__name__} does not say how many classes it has (num_classes)")
    if ckpt is not None:
        backbone, feature_dim, _ = load_backbone(ckpt)
        name = ckpt.backbone
    else:
        backbone, feature_dim = _random_backbone(cfg)
        name = cfg.model.backbone
    lr = scaled_lr(recipe["lr"], cfg.batch_size) if cfg.scale_lr else recipe["lr"]
    model = FineTuner(backbone, feature_dim, num_classes, **{**recipe, "lr": lr})

    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    for callback in callbacks:
        if isinstance(callback, ResumeState) and callback.config is None:  # the config in every checkpoint
            callback.config = OmegaConf.to_yaml(cfg)
    loggers = [instantiate(node) for node in (cfg.get("logger") or {}).values() if node is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    share_cpus(datamodule, trainer)
    ckpt_path = _resume_path(cfg, model, trainer)
    for logger in trainer.loggers:  # the label settings, the checkpoint and the recipe beside the metrics
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})
    result = train_finetuner(model, datamodule, trainer, ckpt_path)

    output_dir = OmegaConf.select(cfg, "paths.output_dir")
    classifier, not_exported = None, None
    if output_dir and trainer.is_global_zero:
        try:
            classifier = export_classifier(model, output_dir)
        except ValueError as err:  # a backbone with no torchvision / DeiT / timm layout: the checkpoints hold it
            not_exported = f"{err}; the fine-tuned network is in {Path(output_dir) / 'checkpoints'} (backbone.*, fc.*)"
    arch = resnet_arch(model.backbone)
    return {
        "checkpoint": ckpt.path if ckpt is not None else RANDOM_INIT,
        "backbone": name,
        "cifar_stem": arch[1] if arch else None,
        "dataset": type(datamodule).__name__,
        "num_classes": num_classes,
        **labels,
        "recipe": HydraConfig.get().runtime.choices.get("finetune_recipe") if HydraConfig.initialized() else None,
        "optimizer": recipe["optimizer"],
        "lr": lr,
        "backbone_lr": lr * recipe["backbone_lr_factor"],
        "weight_decay": recipe["weight_decay"],
        "warmup_epochs": recipe["warmup_epochs"],
        "global_batch": cfg.batch_size,
        "epochs": cfg.trainer.max_epochs,
        "finetune_top1": result["top1"],
        "finetune_top5": result["top5"],
        "last_epoch": result["last_epoch"] + 1,  # epochs counted from 1, as printed
        "finetune_best_top1": result["best_top1"],
        "best_epoch": result["best_epoch"] + 1,
        "val_top1_per_epoch": {str(e + 1): top1 for e, top1 in result["history"].items()},
        "resumed_from": ckpt_path,
        "classifier": str(classifier) if classifier is not None else None,
        "classifier_not_exported": not_exported,
        "wall_time_s": round(time.perf_counter() - start, 3),
    }, trainer


def summary(result: dict[str, Any]) -> str:
    """The one line printed at the end: the data, the labels and the last / best validation top-1."""
    labels = (f"label_subset_file={result['label_subset_file']}" if result.get("label_subset_file")
              else f"label_fraction={result['label_fraction']:g}")
    return (f"fine-tuning on {result['dataset']} ({result['labelled_images']} labelled images, {labels}): last top-1 "
            f"{100 * result['finetune_top1']:.2f} %, best top-1 {100 * result['finetune_best_top1']:.2f} % "
            f"(epoch {result['best_epoch']})")


def how_to_load(result: dict[str, Any]) -> str:
    """One line saying where the exported classifier is and how plain torchvision (or timm) loads it."""
    path, classes = result["classifier"], result["num_classes"]
    if path is None:
        return f"classifier: not exported ({result.get('classifier_not_exported')})"
    if Path(path).name == "classifier_timm.pth":
        return (f"classifier: {path} (timm.create_model('{str(result['backbone']).removeprefix('timm:')}', "
                f"num_classes={classes}); load_state_dict(torch.load(path), strict=True))")
    if Path(path).name == "classifier_deit.pth":
        return (f"classifier: {path} (timm VisionTransformer of the backbone's size with num_classes={classes}: "
                "load_state_dict(torch.load(path)['model']))")
    if result["backbone"] is None or result["cifar_stem"] is None:
        return f"classifier: {path} (a torchvision ResNet state dict with fc = the classifier)"
    build = f"torchvision.models.{result['backbone']}(num_classes={classes})"
    stem = (", then the CIFAR stem: conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), maxpool = nn.Identity() (or "
            f"moco_lightning.eval.torchvision_model('{result['backbone']}', cifar_stem=True, num_classes={classes}))"
            if result["cifar_stem"] else "")
    return f"classifier: {path} ({build}{stem}; load_state_dict(torch.load(path), strict=True))"


# ---------------------------------------------------------------------------------------------- config pieces
def _pretrained(cfg: DictConfig) -> bool:
    """Whether ``checkpoint`` names pretrained weights (``none`` / ``null``: random initialisation)."""
    try:
        value = cfg.checkpoint
    except MissingMandatoryValue:
        raise ConfigError("checkpoint is not set; pass checkpoint=<a .ckpt written by moco-train, or an official "
                          "MoCo checkpoint>, or checkpoint=none for the supervised baseline from random "
                          "initialisation") from None
    return value is not None and str(value).lower() != RANDOM_INIT


def _recipe(cfg: DictConfig) -> dict[str, Any]:
    """The :class:`FineTuner` arguments of the recipe (conf/finetune_recipe), checked."""
    recipe = {
        "optimizer": str(cfg.optimizer),
        "lr": float(cfg.lr),
        "backbone_lr_factor": float(cfg.backbone_lr_factor),
        "weight_decay": float(cfg.weight_decay),
        "momentum": float(cfg.get("momentum", 0.9)),
        "nesterov": bool(cfg.get("nesterov", False)),
        "betas": [float(b) for b in cfg.get("betas", (0.9, 0.999))],
        "warmup_epochs": float(cfg.warmup_epochs),
        "label_smoothing": float(cfg.label_smoothing),
    }
    try:
        check_finetune_args(**{k: v for k, v in recipe.items() if k != "betas"})
    except ValueError as err:
        raise ConfigError(f"{err} (conf/finetune_recipe/; override with key=value)") from None
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive number of images (the global batch)")
    return recipe


def _command_line_keys() -> list[str]:
    """The keys and groups set on the command line of the Hydra run (none outside one)."""
    if not HydraConfig.initialized():
        return []
    return [str(o).split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task]


def _check_backbone_not_given(cfg: DictConfig, checkpoint_backbone: str | None) -> None:
    """``backbone=...`` (or ``model.*``) with a checkpoint: the checkpoint decides the backbone, say so."""
    given = [key for key in _command_line_keys() if key == "backbone" or key.startswith("model.")]
    if given:
        raise ConfigError(f"{given[0]}=... applies to checkpoint=none only: the backbone of checkpoint "
                          f"{cfg.checkpoint} is read from it ({checkpoint_backbone or 'a custom module'}); leave "
                          f"{given[0]} out, or set checkpoint=none for the supervised baseline")


def _random_backbone(cfg: DictConfig) -> tuple[Any, int]:
    """The ``backbone`` group's network (``model.*``: name, stem, ViT geometry) at random initialisation."""
    options = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k != "_target_"}
    try:
        return build_backbone(options.pop("backbone"), **options)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{err} (checkpoint=none builds backbone=<option> of conf/backbone/)") from None


def _resume_path(cfg: DictConfig, model: FineTuner, trainer: L.Trainer) -> str | None:
    """``ckpt_path``: ``null`` (start), ``auto`` (the run folder's ``checkpoints/last.ckpt`` if any) or a file.

    The file is read and checked against ``model`` before Lightning restores it; the loggers continue the run's
    logs.
    """
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    if str(value) == "auto":
        path = Path(str(cfg.paths.output_dir)) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            log.info("ckpt_path=auto: no %s: starting from scratch", path)
            if HydraConfig.initialized() and not any(str(o).lstrip("+").startswith("hydra.run.dir=")
                                                     for o in HydraConfig.get().overrides.hydra):
                log.warning("ckpt_path=auto looked in a new run folder (new at every launch); to resume a run, "
                            "give its folder: hydra.run.dir=<run folder> ckpt_path=auto")
            return None
    else:
        path = Path(str(value)).expanduser()
    checkpoint = read_training_checkpoint(path)
    check_checkpoint_matches(checkpoint, model, path)
    continue_loggers(trainer.loggers, checkpoint)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    print(f"resuming from {path} (after epoch {int(checkpoint.get('epoch', 0)) + 1})", flush=True)
    return str(path)


# ---------------------------------------------------------------------------------------------- entry point
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval_finetune")
def _hydra_main(cfg: DictConfig) -> float:
    result, trainer = run_or_exit(finetune_from_config, cfg, USER_ERRORS)
    if trainer.is_global_zero:
        exported = result["classifier"] or result["classifier_not_exported"]
        report(cfg, result, summary(result), *([how_to_load(result)] if exported else []))
    return result["finetune_top1"]


def main() -> None:
    """Console entry point ``moco-finetune``: check the command line's groups and keys, then run Hydra."""
    exit_on_bad_command_line(CONFIG_PATH, "eval_finetune")
    _hydra_main()


if __name__ == "__main__":
    main()
