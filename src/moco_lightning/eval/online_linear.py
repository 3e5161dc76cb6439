"""A linear classifier trained online on detached backbone features, to watch pretraining progress.

The classifier never sends gradient into the backbone: it reads the detached features that
``MoCo.training_step`` returns (``outputs["features"]``, ``outputs["labels"]``) and has its own optimizer.
It sees augmented training views, so its accuracy is a cheap trend line, not the linear-probe protocol number
(use :mod:`moco_lightning.eval.linear` for that).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from moco_lightning import distributed


class OnlineLinearProbe(Callback):
    """Train ``nn.Linear(feature_dim, num_classes)`` on detached features after every training batch.

    Logs ``train/online_linear_loss`` and ``train/online_linear_top1`` (a fraction, over the epoch). Under DDP the
    gradients are averaged so every copy stays identical; weights and optimizer state go into the checkpoint.
    ``num_classes`` defaults to ``trainer.datamodule.num_classes``; ``lr``, ``momentum``, ``weight_decay`` are
    SGD's; ``seed`` seeds a private generator, so adding the probe leaves pretraining's random stream alone.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.seed = seed
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.classifier: nn.Linear | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.accuracy: MulticlassAccuracy | None = None
        self._pending_state: dict[str, Any] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Create the classifier, its optimizer and metric on the module's device."""
        if self.classifier is not None:
            return
        num_classes = self.num_classes or getattr(trainer.datamodule, "num_classes", None)
        if num_classes is None:
            raise RuntimeError(
                "OnlineLinearProbe does not know the number of classes: pass num_classes= or use a "
                "datamodule with a num_classes attribute"
            )
        feature_dim = getattr(pl_module, "feature_dim", None)
        if feature_dim is None:
            raise RuntimeError(f"OnlineLinearProbe needs pl_module.feature_dim; {type(pl_module).__name__} has none")
        self.num_classes = int(num_classes)
        # initialised from its own seed so that adding the probe leaves the run's random stream untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.classifier = nn.Linear(int(feature_dim), self.num_classes).to(pl_module.device)
        self.optimizer = torch.optim.SGD(
            self.classifier.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )
        self.accuracy = MulticlassAccuracy(num_classes=self.num_classes, average="micro").to(pl_module.device)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """One SGD step of the classifier on the batch's detached features; update and log the accuracy."""
        if not isinstance(outputs, dict) or "features" not in outputs or "labels" not in outputs:
            raise RuntimeError(
                "OnlineLinearProbe needs training_step to return {'loss', 'features', 'labels'}; "
                f"{type(pl_module).__name__}.training_step returned {type(outputs).__name__}. "
                "Remove the OnlineLinearProbe callback or return the detached backbone features"
            )
        assert self.classifier is not None and self.optimizer is not None and self.accuracy is not None
        features = outputs["features"].detach().float()
        labels = torch.as_tensor(outputs["labels"], device=features.device).long()
        with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
            logits = self.classifier(features)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if distributed.is_distributed():
            for p in self.classifier.parameters():
                dist.all_reduce(p.grad)
                p.grad /= distributed.world_size()
        self.optimizer.step()
        self.accuracy.update(logits.detach(), labels)
        pl_module.log("train/online_linear_loss", loss.detach(), on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log the epoch's accuracy (synchronised across processes by torchmetrics) and reset it."""
        if self.accuracy is None or not self.accuracy.update_called:
            return
        pl_module.log("train/online_linear_top1", float(self.accuracy.compute()), on_epoch=True)
        self.accuracy.reset()

    def state_dict(self) -> dict[str, Any]:
        """Classifier and optimizer state, saved in the trainer checkpoint."""
        if self.classifier is None or self.optimizer is None:
            return {}
        return {"classifier": self.classifier.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the classifier (deferred until :meth:`setup` if it does not exist yet)."""
        if not state_dict:
            return
        if self.classifier is None or self.optimizer is None:
            self._pending_state = state_dict
            return
        self.classifier.load_state_dict(state_dict["classifier"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self._pending_state = None
