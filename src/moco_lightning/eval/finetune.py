"""Fine-tuning: a pretrained backbone and a new linear classifier trained together with labels.

Unlike the linear probe (:mod:`moco_lightning.eval.linear`), nothing is frozen and batch norm runs in train mode.
This is the semi-supervised evaluation of SimCLR and BYOL (fine-tuning on 1 % or 10 % of the labels, chosen by
:mod:`moco_lightning.data.labels`), and with a randomly initialised backbone the supervised baseline of the same
budget. The result exports as a torchvision ResNet or DeiT / timm classifier (:func:`export_classifier`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from moco_lightning.backbones import timm_architecture
from moco_lightning.eval.checkpoint import BackboneCheckpoint, load_backbone
from moco_lightning.eval.linear import _BackboneClassifier, default_trainer, prepare_labelled_data
from moco_lightning.optim import ResumableLambdaLR, images_per_optimizer_step, lr_lambda, scaled_lr, steps_per_epoch
from moco_lightning.vit import MoCoViT

__all__ = ["FINETUNE_OPTIMIZERS", "FineTuner", "check_finetune_args", "export_classifier", "finetune",
           "prepare_labelled_data", "resnet_arch", "train_finetuner"]

#: Optimizers of :class:`FineTuner`.
FINETUNE_OPTIMIZERS = ("sgd", "adamw")
#: Checkpoint key under which :class:`FineTuner` keeps the validation accuracy of every epoch (for resumed runs).
HISTORY_KEY = "finetune_val_history"
#: torchvision ResNets by (block type, blocks per stage), to name the architecture of a backbone module.
_RESNET_LAYOUTS = {
    ("BasicBlock", (2, 2, 2, 2)): "resnet18",
    ("BasicBlock", (3, 4, 6, 3)): "resnet34",
    ("Bottleneck", (3, 4, 6, 3)): "resnet50",
    ("Bottleneck", (3, 4, 23, 3)): "resnet101",
    ("Bottleneck", (3, 8, 36, 3)): "resnet152",
}


def check_finetune_args(optimizer: str = "sgd", lr: float = 0.0125, backbone_lr_factor: float = 1.0,
                        weight_decay: float = 1e-4, momentum: float = 0.9, nesterov: bool = True,
                        warmup_epochs: float = 0.0, label_smoothing: float = 0.0) -> None:
    """Raise a one-line ``ValueError`` starting ``<argument>=<value>`` for a :class:`FineTuner` setting out of range."""
    if optimizer not in FINETUNE_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not one of {', '.join(FINETUNE_OPTIMIZERS)}; use sgd (SGD with "
                         "Nesterov momentum) or adamw")
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr={lr} must be a positive number (the classifier's learning rate)")
    for name, value in (("backbone_lr_factor", backbone_lr_factor), ("weight_decay", weight_decay),
                        ("momentum", momentum), ("warmup_epochs", warmup_epochs)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name}={value} must be a finite number >= 0")
    if optimizer == "sgd" and nesterov and momentum <= 0:
        raise ValueError(f"nesterov=true needs momentum > 0 (got momentum={momentum}); set nesterov=false or a "
                         "momentum such as 0.9")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1) (0 = plain cross-entropy)")


class FineTuner(_BackboneClassifier):
    """A backbone and a new ``nn.Linear`` classifier, all trained with labels (no layer frozen, BN in train mode).

    Training batches and validation batches are ``(images, labels)``. Logged per epoch: ``train/loss``,
    ``train/acc_top1``, ``train/lr`` (the classifier's), ``val/loss``, ``val/acc_top1``, ``val/acc_top5`` and
    ``val/best_acc_top1`` (fractions). The validation accuracy of every epoch is kept in :attr:`val_history` and
    in the checkpoints, so :meth:`best` and :meth:`last` cover a resumed run's earlier epochs too.

    Args:
        backbone: module mapping images to ``(N, feature_dim)`` features; all its parameters are trained.
        feature_dim: width of the backbone's features.
        num_classes: number of classes.
        optimizer: ``"sgd"`` (``momentum``, ``nesterov``) or ``"adamw"`` (``betas``, decoupled weight decay).
        lr: the classifier's learning rate at the end of the warm-up.
        backbone_lr_factor: the backbone's lr is ``lr x backbone_lr_factor`` (0: only its BN statistics move).
        weight_decay: on every parameter of both groups.
        momentum: SGD momentum.
        nesterov: Nesterov momentum (SGD).
        betas: AdamW's betas.
        warmup_epochs: linear warm-up epochs (fractions allowed), then a cosine to 0 at the end of training.
        label_smoothing: of the training cross-entropy (0: none).

    """

    _TOP1, _TOP5, _KEEP_TOP5 = "acc_top1", "acc_top5", True

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        optimizer: str = "sgd",
        lr: float = 0.0125,
        backbone_lr_factor: float = 1.0,
        weight_decay: float = 1e-4,
        momentum: float = 0.9,
        nesterov: bool = True,
        betas: Sequence[float] = (0.9, 0.999),
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        check_finetune_args(optimizer, lr, backbone_lr_factor, weight_decay, momentum, nesterov, warmup_epochs,
                            label_smoothing)
        self.save_hyperparameters(ignore=["backbone"])
        self.hparams.betas = tuple(float(b) for b in betas)
        # load_backbone returns it in eval mode, which Lightning would keep
        self._add_classifier(backbone.train(), feature_dim, num_classes)
        for p in self.backbone.parameters():
            p.requires_grad_(True)  # fine-tuning: nothing frozen (a ViT's frozen patch projection included)
        self._has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.backbone.modules())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``x``."""
        return self.fc(self.backbone(x))

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups: ``backbone`` at ``lr x backbone_lr_factor`` and ``classifier`` at ``lr``."""
        lr = float(self.hparams.lr)
        return [
            {"name": "backbone", "params": [p for p in self.backbone.parameters() if p.requires_grad],
             "lr": lr * float(self.hparams.backbone_lr_factor)},
            {"name": "classifier", "params": list(self.fc.parameters()), "lr": lr},
        ]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        """Cross-entropy of the whole network on a batch; a batch of one image is skipped when BN trains."""
        x, y = batch[0], batch[1]
        if x.shape[0] < 2 and self._has_batchnorm:  # the last, incomplete batch: BN cannot train on one image
            warnings.warn("fine-tuning skips a training batch of one image (batch norm needs two or more); choose "
                          "a batch_size that does not leave one image over", stacklevel=2)
            return None
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=float(self.hparams.label_smoothing))
        self.train_top1(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc_top1", self.train_top1, on_step=False, on_epoch=True)
        optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if optimizer is not None:
            self.log("train/lr", float(optimizer.param_groups[-1]["lr"]), on_step=False, on_epoch=True)
        return loss

    def last(self) -> tuple[float, float, int]:
        """``(top1, top5, epoch)`` of the last validated epoch."""
        if not self.val_history:
            raise RuntimeError("no validation epoch has run yet")
        epoch = max(self.val_history)
        return *self.val_history[epoch], epoch

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep :attr:`val_history` in the checkpoint (plain numbers: loads with ``weights_only=True``)."""
        checkpoint[HISTORY_KEY] = {int(e): [float(v) for v in acc] for e, acc in self.val_history.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore :attr:`val_history` from a checkpoint of a fine-tuning run."""
        saved = checkpoint.get(HISTORY_KEY) or {}
        self.val_history = {int(e): (float(acc[0]), float(acc[1])) for e, acc in saved.items()}

    def configure_optimizers(self) -> Any:
        """SGD or AdamW over :meth:`param_groups`, with warm-up + cosine moved at every optimizer step."""
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.param_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=bool(hp.nesterov),
                weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, betas=tuple(hp.betas),
                                          weight_decay=hp.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if math.isinf(total):
            raise ValueError("the cosine schedule needs the length of the run: set the Trainer's max_epochs or "
                             "max_steps")
        factor = lr_lambda("cosine", max(int(total), 1), steps_per_epoch(self.trainer),
                           warmup_epochs=float(hp.warmup_epochs))
        scheduler = ResumableLambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """A torchvision ResNet state dict, ``fc`` = the classifier; ``ValueError`` for another backbone.

        A CIFAR stem loads into :func:`moco_lightning.eval.export.torchvision_model` ``(arch, cifar_stem=True)``.
        """
        if not isinstance(self.backbone, models.ResNet):
            hint = ("use deit_state_dict()" if isinstance(self.backbone, MoCoViT)
                    else "save the module's state_dict() instead")
            raise ValueError(f"a {type(self.backbone).__name__} backbone has no torchvision ResNet state dict; {hint}")
        return self._state_dict_with_classifier("fc.")  # the backbone's own fc is an Identity

    def deit_state_dict(self) -> dict[str, torch.Tensor]:
        """A DeiT / timm ``VisionTransformer`` state dict, ``head`` = the classifier; ``ValueError`` for a non-ViT.

        ``vit_conv_*`` stems are not timm's: load those with ``strict=False``.
        """
        if not isinstance(self.backbone, MoCoViT):
            raise ValueError(f"a {type(self.backbone).__name__} backbone has no DeiT state dict; a ResNet exports "
                             "with torchvision_state_dict()")
        return self._state_dict_with_classifier("head.")

    def timm_state_dict(self) -> dict[str, torch.Tensor]:
        """A timm model's state dict, its classifier (``fc``, ``head.fc``, ...) = this one; ``ValueError`` otherwise.

        It loads strictly into ``timm.create_model(<the backbone's name>, num_classes=<classes>)``.
        """
        arch = timm_architecture(self.backbone)
        if arch is None or isinstance(self.backbone, MoCoViT):
            raise ValueError(f"a {type(self.backbone).__name__} backbone is not a timm model; a ResNet exports with "
                             "torchvision_state_dict(), a ViT with deit_state_dict()")
        return self._state_dict_with_classifier(arch[1] + ".")

    def _state_dict_with_classifier(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {**self.backbone.state_dict(), **{prefix + k: v for k, v in self.fc.state_dict().items()}}
        return {k: v.detach().cpu().clone() for k, v in state.items()}


def resnet_arch(module: nn.Module) -> tuple[str, bool] | None:
    """``(torchvision name, cifar_stem)`` of a torchvision ResNet backbone (``("resnet18", True)``), else ``None``."""
    if not isinstance(module, models.ResNet):
        return None
    stages = tuple(len(getattr(module, f"layer{i}")) for i in range(1, 5))
    name = _RESNET_LAYOUTS.get((type(module.layer1[0]).__name__, stages))
    if name is None:
        return None
    cifar_stem = tuple(module.conv1.kernel_size) == (3, 3) and isinstance(module.maxpool, nn.Identity)
    return name, cifar_stem


def export_classifier(model: FineTuner, output_dir: str | Path) -> Path:
    """Write ``classifier_torchvision.pth`` (ResNet), ``classifier_deit.pth`` (ViT) or ``classifier_timm.pth``.

    The DeiT file is ``{"model": state dict}``, the official ``convert_to_deit.py`` layout; the timm file the state
    dict of ``timm.create_model(<name>, num_classes=<classes>)``. ``ValueError`` for another backbone. Returns the path.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(model.backbone, MoCoViT):
        path = output_dir / "classifier_deit.pth"
        torch.save({"model": model.deit_state_dict()}, path)
    elif timm_architecture(model.backbone) is not None:
        path = output_dir / "classifier_timm.pth"
        torch.save(model.timm_state_dict(), path)
    else:
        path = output_dir / "classifier_torchvision.pth"
        torch.save(model.torchvision_state_dict(), path)
    return path


def train_finetuner(model: FineTuner, datamodule: Any, trainer: L.Trainer,
                    ckpt_path: str | Path | None = None) -> dict[str, Any]:
    """Fit ``model`` on ``datamodule.eval_train_dataloader(augment=True)``, validating on ``eval_val_dataloader()``.

    ``datamodule`` is ready (:func:`prepare_labelled_data`); ``ckpt_path`` is a checkpoint of this run to resume.
    Returns ``{"top1", "top5", "last_epoch"}`` of the last epoch (validated here if it was not), ``{"best_top1",
    "best_epoch"}`` of the best one (epochs from 0, accuracies as fractions) and ``"history"`` ``{epoch: top1}``.
    """
    if hasattr(datamodule, "batches_device"):  # the loaders are built before fit: pin for the trainer's device
        datamodule.batches_device = trainer.strategy.root_device
    train_loader = datamodule.eval_train_dataloader(augment=True)
    val_loader = datamodule.eval_val_dataloader()
    trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader,
                ckpt_path=str(ckpt_path) if ckpt_path is not None else None)
    last_epoch = trainer.current_epoch - 1
    if last_epoch >= 0 and last_epoch not in model.val_history:
        metrics = trainer.validate(model, dataloaders=val_loader, verbose=False)[0]
        model.val_history[last_epoch] = (float(metrics["val/acc_top1"]), float(metrics["val/acc_top5"]))
    top1, top5, epoch = model.last()
    best_top1, best_epoch = model.best()
    return {"top1": top1, "top5": top5, "last_epoch": epoch, "best_top1": best_top1, "best_epoch": best_epoch,
            "history": {e: acc[0] for e, acc in sorted(model.val_history.items())}}


def finetune(
    checkpoint: str | Path | Mapping[str, Any] | BackboneCheckpoint | None = None,
    datamodule: Any = None,
    *,
    backbone: str | nn.Module | None = None,
    cifar_stem: bool = False,
    feature_dim: int | None = None,
    num_classes: int | None = None,
    epochs: int = 100,
    optimizer: str = "sgd",
    lr: float = 0.05,
    scale_lr: bool = True,
    backbone_lr_factor: float = 1.0,
    weight_decay: float = 1e-4,
    momentum: float = 0.9,
    nesterov: bool = True,
    betas: Sequence[float] = (0.9, 0.999),
    warmup_epochs: float = 5.0,
    label_smoothing: float = 0.0,
    trainer: L.Trainer | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
    ckpt_path: str | Path | None = None,
) -> tuple[dict[str, Any], FineTuner]:
    """Fine-tune a pretrained backbone (or a random one) with a new classifier and report validation accuracy.

    Args:
        checkpoint: a moco-lightning (or official MoCo) pretraining checkpoint whose query backbone is fine-tuned.
            ``None``: ``backbone`` is a name (randomly initialised: the supervised baseline) or a module (as is).
        datamodule: gives ``eval_train_dataloader(augment=True)`` (training; restrict it to few labels with its
            ``use_labelled_subset``), ``eval_val_dataloader()`` and ``num_classes``.
        backbone: override the checkpoint's backbone, or the backbone without a checkpoint.
        cifar_stem: the small-image stem for a backbone given by name without a checkpoint.
        feature_dim: width of a backbone module's features (found by a dry pass when not given).
        num_classes: defaults to ``datamodule.num_classes``.
        epochs: training epochs (the Trainer's ``max_epochs`` when ``trainer`` is not given).
        optimizer: ``"sgd"`` or ``"adamw"``.
        lr: the classifier's lr, or with ``scale_lr`` its lr per 256 images (``lr x global batch / 256``; SimCLR's
            fine-tuning rule is 0.05 per 256).
        scale_lr: scale ``lr`` by the global batch (loader batch x processes x accumulation) / 256.
        backbone_lr_factor: the backbone's lr = the classifier's x this.
        weight_decay: on every parameter.
        momentum: SGD momentum.
        nesterov: Nesterov momentum (SGD).
        betas: AdamW's betas.
        warmup_epochs: linear warm-up epochs before the cosine.
        label_smoothing: of the training loss.
        trainer: a ready Trainer (``epochs`` and ``trainer_kwargs`` are then ignored).
        trainer_kwargs: extra ``L.Trainer`` arguments.
        ckpt_path: a checkpoint of this fine-tuning to resume from.

    Returns:
        The result of :func:`train_finetuner` and the fine-tuned :class:`FineTuner`.

    """
    if datamodule is None:
        raise ValueError("finetune needs a datamodule with eval_train_dataloader(augment=...) and "
                         "eval_val_dataloader()")
    if checkpoint is not None:
        module, dim, _ = load_backbone(checkpoint, backbone=backbone)
    elif backbone is not None:
        from moco_lightning.backbones import build_backbone

        module, dim = build_backbone(backbone, cifar_stem=cifar_stem if isinstance(backbone, str) else False,
                                     feature_dim=feature_dim)
    else:
        raise ValueError("finetune needs checkpoint=<path>, or backbone=<name> (random initialisation) or "
                         "backbone=<nn.Module>")
    found = prepare_labelled_data(datamodule)
    classes = num_classes or found
    if not classes:
        raise ValueError(f"number of classes unknown: pass num_classes=... or give {type(datamodule).__name__} a "
                         "num_classes attribute")
    trainer = default_trainer(trainer, epochs, trainer_kwargs)
    if scale_lr:
        batch = datamodule.eval_train_dataloader(augment=True).batch_size
        lr = scaled_lr(lr, images_per_optimizer_step(batch, trainer.world_size, trainer.accumulate_grad_batches))
    model = FineTuner(module, dim, classes, optimizer=optimizer, lr=lr, backbone_lr_factor=backbone_lr_factor,
                      weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, betas=betas,
                      warmup_epochs=warmup_epochs, label_smoothing=label_smoothing)
    return train_finetuner(model, datamodule, trainer, ckpt_path), model
