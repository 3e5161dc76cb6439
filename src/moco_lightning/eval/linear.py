"""Linear evaluation with the official MoCo protocols (facebookresearch/moco and moco-v3 ``main_lincls.py``).

The pretrained query backbone is frozen *and kept in eval mode*, so neither its weights nor its batch-norm
statistics can move; only a new linear layer trains, initialised N(0, 0.01) with zero bias. MoCo v1/v2 protocol:
SGD lr 30, momentum 0.9, weight decay 0, the lr divided by 10 at epochs 60 and 80 of 100, batch 256. MoCo v3
protocol: 90 epochs, batch 1024, SGD momentum 0.9, weight decay 0, base lr 0.1 (ResNet-50; 3 for ViTs) per 256
images, cosine per epoch (``schedule="cosine", scale_lr=True``). After the first epoch, a sanity check compares
every backbone weight and buffer with the checkpoint and fails loudly if one changed, as the official code does.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from moco_lightning.eval.checkpoint import load_backbone
from moco_lightning.optim import LR_SCHEDULES, lr_lambda, scaled_lr


class _BackboneClassifier(L.LightningModule):
    """A backbone and a new ``nn.Linear`` classifier with top-1 / top-5 metrics: the probe's and fine-tuner's base.

    Subclasses set the metric names ``_TOP1`` / ``_TOP5`` and whether :attr:`val_history` keeps ``(top1, top5)``
    (``_KEEP_TOP5``) or top-1 alone.
    """

    _TOP1, _TOP5, _KEEP_TOP5 = "top1", "top5", False

    def _add_classifier(self, backbone: nn.Module, feature_dim: int, num_classes: int) -> None:
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)
        # official main_lincls.py: fc.weight ~ N(0, 0.01), fc.bias = 0
        nn.init.normal_(self.fc.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.train_top1 = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro")
        #: the validation after each training epoch (counted from 0): ``{epoch: top1}`` or ``{epoch: (top1, top5)}``.
        self.val_history: dict[int, Any] = {}

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.val_top1(logits, y)
        self.val_top5(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/{self._TOP1}", self.val_top1, prog_bar=True)
        self.log(f"{stage}/{self._TOP5}", self.val_top5)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``val/loss`` and the validation top-1 / top-5 (fractions)."""
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        """Record this epoch's validation accuracy (not Lightning's sanity check); log the best top-1 so far."""
        if self.trainer.sanity_checking or self.trainer.state.fn != "fit":
            return
        top1 = float(self.val_top1.compute())
        self.val_history[self.current_epoch] = (top1, float(self.val_top5.compute())) if self._KEEP_TOP5 else top1
        self.log(f"val/best_{self._TOP1}", self.best()[0])

    def best(self) -> tuple[float, int]:
        """``(top1, epoch)`` of the best validated epoch, the earliest of ties (the official script reports it)."""
        if not self.val_history:
            raise RuntimeError("no validation epoch has run yet")
        top1 = {e: v[0] if self._KEEP_TOP5 else v for e, v in self.val_history.items()}
        epoch = max(top1, key=lambda e: (top1[e], -e))
        return top1[epoch], epoch


def default_trainer(trainer: L.Trainer | None, epochs: int, trainer_kwargs: Mapping[str, Any] | None) -> L.Trainer:
    """``trainer``, or a new one for ``epochs`` (no logger, no checkpoints) updated by ``trainer_kwargs``."""
    if trainer is not None:
        return trainer
    return L.Trainer(**{"max_epochs": epochs, "logger": False, "enable_checkpointing": False, **(trainer_kwargs or {})})


def prepare_labelled_data(datamodule: Any, what: str = "fine-tuning") -> int | None:
    """``prepare_data()`` and ``setup("fit")`` a datamodule and check that it has labels.

    Returns its ``num_classes`` (``None`` when it has no such attribute). ``what`` names the evaluation in the
    error of a datamodule without labels (``require_labels``).
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    if hasattr(datamodule, "require_labels"):
        datamodule.require_labels(what)
    num_classes = getattr(datamodule, "num_classes", None)
    return int(num_classes) if num_classes else None


class LinearProbe(_BackboneClassifier):
    """A frozen backbone (always in eval mode) followed by a trainable ``nn.Linear`` classifier.

    Args:
        backbone: module mapping images to ``(N, feature_dim)`` features; it is frozen here.
        feature_dim: width of the backbone's features.
        num_classes: number of classes.
        lr: SGD learning rate (official v1/v2: 30).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (0).
        schedule: "step" (x``gamma`` at each of ``milestones``), "cosine" (to 0 over ``max_epochs``), "constant".
        milestones: epochs of the step decays (official: 60, 80 of 100).
        gamma: step decay factor (0.1).
        max_epochs: length of the cosine schedule (100).
        sanity_check: after the first epoch, check that the backbone equals ``reference_state``.
        reference_state: the pretrained state to check against (default: a copy of the backbone's, taken here).

    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        lr: float = 30.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        schedule: str = "step",
        milestones: Sequence[int] = (60, 80),
        gamma: float = 0.1,
        max_epochs: int = 100,
        sanity_check: bool = True,
        reference_state: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if schedule not in LR_SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is not one of {LR_SCHEDULES}; set schedule=step or cosine")
        self.save_hyperparameters(ignore=["backbone", "reference_state"])
        self._add_classifier(backbone, feature_dim, num_classes)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        source = reference_state if reference_state is not None else self.backbone.state_dict()
        self.reference_state = {k: v.detach().clone().cpu() for k, v in source.items()}

    def train(self, mode: bool = True) -> LinearProbe:
        """Set the classifier's mode; the backbone stays in eval mode so BN statistics cannot move."""
        super().train(mode)
        self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` of images ``x``."""
        with torch.no_grad():
            features = self.backbone(x)
        return self.fc(features.detach().float())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of the classifier; logs ``train/loss`` and ``train/top1``."""
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_top1(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``test/loss``, ``test/top1``, ``test/top5`` (fractions)."""
        self._evaluate(batch, "test")

    def check_backbone_unchanged(self) -> None:
        """Raise ``RuntimeError`` naming the first backbone weight or BN statistic that differs from the checkpoint."""
        state = self.backbone.state_dict()
        if set(state) != set(self.reference_state):
            diff = sorted(set(state) ^ set(self.reference_state))
            raise RuntimeError(
                f"linear probe sanity check failed: backbone keys differ from the checkpoint: {diff[:5]}"
            )
        for key, value in state.items():
            if not torch.equal(value.detach().cpu(), self.reference_state[key]):
                raise RuntimeError(
                    f"linear probe sanity check failed: backbone {key!r} changed during linear training, "
                    "so the backbone was not frozen (or not kept in eval mode, which lets BN statistics "
                    "move); the reported accuracy would not be a linear-probe number"
                )

    def on_train_epoch_end(self) -> None:
        """After the first epoch, run :meth:`check_backbone_unchanged` (official ``sanity_check``)."""
        if self.hparams.sanity_check and self.current_epoch == 0:
            self.check_backbone_unchanged()

    def configure_optimizers(self) -> Any:
        """SGD on the classifier only, with the step / cosine / constant schedule stepped per epoch."""
        hp = self.hparams
        optimizer = torch.optim.SGD(self.fc.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        # the pretraining schedules, stepped once per epoch: an "optimizer step" of lr_lambda is an epoch here
        factor = lr_lambda(hp.schedule, total_steps=max(1, int(hp.max_epochs)), steps_per_epoch=1,
                           milestones=hp.milestones, gamma=hp.gamma)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def _train_loader(datamodule: Any, augment: bool) -> Any:
    """``eval_train_dataloader(augment=...)`` when the datamodule supports the flag, else the plain one."""
    fn = datamodule.eval_train_dataloader
    if "augment" in inspect.signature(fn).parameters:
        return fn(augment=augment)
    return fn()


def linear_eval(
    checkpoint: str | Path | Mapping[str, Any] | None = None,
    datamodule: Any = None,
    *,
    backbone: str | nn.Module | None = None,
    feature_dim: int | None = None,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 30.0,
    scale_lr: bool = False,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "step",
    milestones: Sequence[int] = (60, 80),
    gamma: float = 0.1,
    augment_train: bool = True,
    sanity_check: bool = True,
    trainer: L.Trainer | None = None,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """Train a linear classifier on a frozen pretrained backbone and report its validation accuracy.

    Args:
        checkpoint: a moco-lightning (or official MoCo) pretraining checkpoint; ``None``: ``backbone`` is a module.
        datamodule: gives ``eval_train_dataloader([augment])``, ``eval_val_dataloader()`` and ``num_classes``.
        backbone: override the checkpoint's backbone (name or module), or the module to evaluate without one.
        feature_dim: the width of a ``backbone`` module given without a checkpoint.
        num_classes: defaults to ``datamodule.num_classes``.
        epochs: training epochs (official v1/v2: 100; v3: 90).
        lr: SGD learning rate (v1/v2: 30), or with ``scale_lr`` the base lr per 256 images (v3: 0.1 ResNet, 3 ViT).
        scale_lr: use ``lr × global batch / 256`` (loader batch × processes × accumulation; official v3).
        momentum: SGD momentum (0.9).
        weight_decay: SGD weight decay (0).
        schedule: "step", "cosine" or "constant".
        milestones: epochs of the step decays (60, 80).
        gamma: step decay factor (0.1).
        augment_train: train on the datamodule's augmented (crop + flip) view when it offers one.
        sanity_check: verify after epoch 1 that the backbone did not change.
        trainer: a ready Trainer (``epochs`` and ``trainer_kwargs`` are then ignored).
        trainer_kwargs: extra ``L.Trainer`` arguments (devices, precision, logger...).

    Returns:
        ``{"top1", "top5"}`` of the last epoch and ``{"best_top1", "best_epoch"}`` of the best validation epoch
        (the official script reports the best), accuracies as fractions in [0, 1].

    """
    if datamodule is None:
        raise ValueError("linear_eval needs a datamodule with eval_train_dataloader() and eval_val_dataloader()")
    reference = None
    if checkpoint is not None:
        module, dim, ckpt = load_backbone(checkpoint, backbone=backbone)
        reference = ckpt.state_dict
    elif isinstance(backbone, nn.Module):
        from moco_lightning.backbones import build_backbone

        module, dim = build_backbone(backbone, feature_dim=feature_dim)
    else:
        raise ValueError("linear_eval needs checkpoint=<path> (or backbone=<nn.Module> to evaluate a module as is)")

    found = prepare_labelled_data(datamodule, "the linear probe")
    num_classes = num_classes or found
    if num_classes is None:
        raise ValueError("number of classes unknown: pass num_classes=... or give the datamodule num_classes")
    trainer = default_trainer(trainer, epochs, trainer_kwargs)
    if hasattr(datamodule, "batches_device"):  # the loaders are built before fit: pin for the trainer's device
        datamodule.batches_device = trainer.strategy.root_device
    train_loader = _train_loader(datamodule, augment_train)
    if scale_lr:
        lr = scaled_lr(lr, train_loader.batch_size * trainer.world_size * trainer.accumulate_grad_batches)
    probe = LinearProbe(
        module,
        dim,
        int(num_classes),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        milestones=milestones,
        gamma=gamma,
        max_epochs=epochs,
        sanity_check=sanity_check,
        reference_state=reference,
    )
    val_loader = datamodule.eval_val_dataloader()
    with warnings.catch_warnings():
        # the frozen backbone is in eval mode on purpose: Lightning's warning about it would only confuse
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        trainer.fit(probe, train_dataloaders=train_loader, val_dataloaders=val_loader)
    metrics = trainer.validate(probe, dataloaders=val_loader, verbose=False)[0]
    result = {"top1": float(metrics["val/top1"]), "top5": float(metrics["val/top5"])}
    if probe.val_history:
        result["best_top1"], result["best_epoch"] = probe.best()
    else:  # no validation ran during fit (e.g. limit_val_batches=0): the last is the only one
        result["best_top1"], result["best_epoch"] = result["top1"], trainer.current_epoch - 1
    return result
