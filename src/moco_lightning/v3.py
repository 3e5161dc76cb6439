"""MoCo v3 as a LightningModule: queries matched to a momentum encoder's keys of the other view, in the batch.

A base encoder with a predictor learns to pick, among the keys of the whole global batch (no queue), the momentum
encoder's key of the other view of its own image.

Read it top to bottom: :class:`MoCoV3` wires the same small parts as :class:`moco_lightning.MoCo`
(:mod:`~moco_lightning.backbones`, :mod:`~moco_lightning.heads`, :mod:`~moco_lightning.ema`,
:mod:`~moco_lightning.losses`, :mod:`~moco_lightning.optim`, :mod:`~moco_lightning.distributed`) and keeps the
names of the official code (facebookresearch/moco-v3, ``moco/builder.py``): ``base_encoder``,
``momentum_encoder``, ``predictor``, ``contrastive_loss(q, k)``, ``forward(x1, x2, m)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from moco_lightning.backbones import build_backbone, check_backbone_name
from moco_lightning.bn import SPLIT_MODES, check_bn_mode, convert_batchnorm
from moco_lightning.ema import MOMENTUM_SCHEDULES, MomentumUpdateAfterStep, momentum_update
from moco_lightning.heads import Encoder, build_mlp
from moco_lightning.init_weights import check_init_from, init_backbone
from moco_lightning.losses import batch_positive_accuracy, moco_v3_loss
from moco_lightning.optim import LR_INTERVALS, OPTIMIZERS, configure_optimization
from moco_lightning.scalars import device_scalar
from moco_lightning.speed import compile_backbones, memory_format, to_layout
from moco_lightning.vit import MoCoViT

#: Values of MoCoV3's ``bn`` setting: the BN modes of :mod:`moco_lightning.bn` that mean something without a queue
#: or a key shuffle. ``"sync"``: BatchNorm over the global batch of all processes (the official code's SyncBN);
#: ``"none"``: plain per-process BatchNorm; ``"auto"``: the official choice, ``"sync"``.
V3_BN_MODES = ("auto", "sync", "none")


def check_moco_v3_args(
    dim: int = 256, mlp_dim: int = 4096, temperature: float = 1.0, momentum: float = 0.99,
    momentum_schedule: str = "cosine",
    optimizer: str = "lars", lr_interval: str = "step", bn: str = "sync", backbone: str | nn.Module = "resnet50",
) -> None:
    """Raise a ``ValueError`` when a MoCo v3 hyper-parameter is out of range; its message starts with ``<name>=``.

    The one place these ranges are written: the constructor calls it, and so does the training CLI on the config
    (prefixing ``model.``) before anything is built.
    """
    check_backbone_name(backbone)
    check_bn_mode(bn, V3_BN_MODES, "MoCo v3", " (shuffle and split BN hide the positive key of a queue; MoCo v3 has "
                  "none)" if bn in ("shuffle", *SPLIT_MODES) else "")
    if dim < 1:
        raise ValueError(f"dim={dim} must be a positive width (official 256)")
    if mlp_dim < 1:
        raise ValueError(f"mlp_dim={mlp_dim} must be a positive width (official 4096)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (MoCo v3 uses 1.0 for ResNet, 0.2 for ViT)")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1] (MoCo v3 uses 0.99)")
    if momentum_schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"momentum_schedule={momentum_schedule} must be one of {', '.join(MOMENTUM_SCHEDULES)}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer} must be one of {', '.join(OPTIMIZERS)} (MoCo v3: lars for ResNet, "
                         "adamw for ViT)")
    if lr_interval not in LR_INTERVALS:
        raise ValueError(f"lr_interval={lr_interval} must be one of {', '.join(LR_INTERVALS)}")


class MoCoV3(MomentumUpdateAfterStep, L.LightningModule):
    """MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

    ``base_encoder`` (backbone + projector) followed by ``predictor`` maps each view to a query; the
    ``momentum_encoder`` (backbone + projector, a copy of the base encoder that never receives gradients) maps
    each view to a key. The loss is symmetric: ``contrastive_loss(q1, k2) + contrastive_loss(q2, k1)``, where each
    query is contrasted with the keys of every image of the global batch (its positive is the key of its own image).

    The momentum encoder follows the base encoder (projector included, predictor excluded) with m rising from
    ``momentum`` to 1 on a half cosine over all optimizer steps (``momentum_schedule="cosine"``, official
    ``--moco-m-cos``). Order of updates: the official loop updates the momentum encoder at the start of iteration
    ``i`` with ``m(i / total)``; this module updates it right after optimizer step ``j`` with ``m(j / total)``
    (:class:`~moco_lightning.ema.MomentumUpdateAfterStep`). Iteration ``i`` of the official code runs after ``i``
    optimizer steps, so the momentum encoder computing the keys of step ``j + 1`` is the same in both: the same
    sequence of weights. (The official update at iteration 0 is a no-op, both encoders being equal; the update after
    the very last step, which the official loop never makes, has m = 1 with the cosine schedule: a no-op too.)

    Heads as in the official code (:func:`~moco_lightning.heads.build_mlp`): for a ResNet (or a custom backbone) a
    2-layer projector ``D → mlp_dim → dim`` ending in an affine-free BN and a 2-layer predictor ``dim → mlp_dim →
    dim`` without last BN; for a ViT a 3-layer projector and a 2-layer predictor, both ending in the affine-free BN.

    Defaults are the official ResNet-50 recipe (100 epochs, 68.9 linear top-1 on ImageNet at batch 4096): dim 256,
    mlp_dim 4096, T 1.0, m 0.99 → 1 (cosine), LARS lr 0.6 per 256 images, weight decay 1e-6, 10 warm-up epochs
    then a half cosine, per step. The ViT recipe: ``temperature=0.2, optimizer="adamw", lr=1.5e-4,
    weight_decay=0.1, warmup_epochs=40`` (300 epochs).

    Args:
        backbone: a name from :data:`moco_lightning.backbones.BACKBONES` (``resnet50``, ``vit_small``, ...) or any
            module mapping images to ``(N, D)`` features.
        dim: output width of projector and predictor (official ``--moco-dim``, 256).
        mlp_dim: hidden width of projector and predictor (official ``--moco-mlp-dim``, 4096).
        temperature: T of the logits (official ``--moco-t``: 1.0 ResNet, 0.2 ViT).
        momentum: m0 of the momentum encoder (official ``--moco-m``: 0.99; 0.996 for 1000 epochs).
        momentum_schedule: ``"cosine"`` (m0 → 1, official ``--moco-m-cos``) or ``"constant"``.
        cifar_stem: ResNets: a 3x3 stride-1 stem without max-pool, for small images.
        feature_dim: width of a custom backbone's features (found by a dry forward when ``None``).
        zero_init_residual: ResNets: zero-initialise the last BN of each residual block (official: on).
        image_size: ViTs: side of the input images in pixels (224).
        patch_size: ViTs: side of a patch in pixels (16; 4 at 32 px).
        freeze_patch_embed: ViTs: keep the random patch projection frozen (official ``--stop-grad-conv1``, on in
            the ViT recipes).
        bn: how BatchNorm sees the batch under DDP, the same setting as :class:`~moco_lightning.MoCo`'s ``bn`` with
            the values of :data:`V3_BN_MODES`: ``"sync"`` (default, the official code) normalises over the global
            batch of all processes, in the encoders and the predictor; ``"none"`` keeps per-process statistics;
            ``"auto"`` is ``"sync"``. One process: plain BN either way.
        optimizer: ``"lars"`` (ResNet), ``"adamw"`` (ViT) or ``"sgd"``.
        lr: base learning rate per 256 images when ``scale_lr`` (official: ``lr × batch / 256``).
        scale_lr: use ``lr × global batch / 256`` (global batch = per-device batch × processes × accumulation).
        weight_decay: weight decay (LARS: 1e-6, not on 1-D parameters; AdamW: 0.1, on every parameter).
        optimizer_momentum: momentum of LARS and SGD (0.9).
        trust_coefficient: LARS trust coefficient (0.001).
        betas: AdamW betas ((0.9, 0.999), PyTorch's default, kept by the official code).
        lr_schedule: ``"cosine"`` (after the warm-up), ``"step"`` or ``"constant"``.
        lr_interval: ``"step"`` moves the lr at every optimizer step, as the official code; ``"epoch"`` once
            per epoch.
        lr_milestones: epochs at which the ``"step"`` schedule multiplies the lr by 0.1.
        warmup_epochs: epochs of linear warm-up from 0 (official: 10 ResNet, 40 ViT).
        channels_last: NHWC weights and image batches (:mod:`moco_lightning.speed`), as ``MoCo``'s.
        compile: ``torch.compile`` the backbones of both encoders in place, as ``MoCo``'s.
        init_from: a weights file to start the base backbone from (the momentum encoder is its copy; projector and
            predictor start random), as ``MoCo``'s (:mod:`moco_lightning.init_weights`).

    """

    #: The range checks of the arguments: the constructor runs them, and the training CLI on the config.
    check_args = staticmethod(check_moco_v3_args)
    #: The check that ``init_from`` fits the backbone (names and shapes only), run by the training CLI on the config.
    check_init_from = staticmethod(check_init_from)

    def __init__(
        self,
        backbone: str | nn.Module = "resnet50",
        dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 1.0,
        momentum: float = 0.99,
        momentum_schedule: str = "cosine",
        cifar_stem: bool = False,
        feature_dim: int | None = None,
        zero_init_residual: bool = True,
        image_size: int = 224,
        patch_size: int = 16,
        freeze_patch_embed: bool = True,
        bn: str = "sync",
        optimizer: str = "lars",
        lr: float = 0.6,
        scale_lr: bool = True,
        weight_decay: float = 1e-6,
        optimizer_momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        betas: Sequence[float] = (0.9, 0.999),
        lr_schedule: str = "cosine",
        lr_interval: str = "step",
        lr_milestones: Sequence[float] = (),
        warmup_epochs: float = 10,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        init_from = None if init_from is None else str(init_from)  # a str in the hyper-parameters, not a Path
        betas = tuple(float(b) for b in betas)  # plain types in checkpoints (not ListConfig)
        lr_milestones = tuple(float(e) for e in lr_milestones)
        check_moco_v3_args(dim=dim, mlp_dim=mlp_dim, temperature=temperature, momentum=momentum,
                           momentum_schedule=momentum_schedule, optimizer=optimizer, lr_interval=lr_interval, bn=bn,
                           backbone=backbone)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.T, self.m = temperature, momentum

        net, self.feature_dim = build_backbone(
            backbone, cifar_stem=cifar_stem, feature_dim=feature_dim, zero_init_residual=zero_init_residual,
            image_size=image_size, patch_size=patch_size, freeze_patch_embed=freeze_patch_embed,
        )
        if init_from is not None:
            init_backbone(net, init_from)  # before the momentum encoder is copied from the base encoder
        vit = isinstance(net, MoCoViT)
        self.base_encoder = Encoder(net, build_mlp(3 if vit else 2, self.feature_dim, mlp_dim, dim))
        self.memory_format = memory_format(channels_last)
        self.base_encoder.to(memory_format=self.memory_format)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_encoder.requires_grad_(False)
        self.predictor = build_mlp(2, dim, mlp_dim, dim, last_bn=vit)
        compile_backbones([self.base_encoder, self.momentum_encoder], compile)  # in place: same checkpoint keys

    # ------------------------------------------------------------------ the algorithm, as the official builder
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the base encoder ``(N, D)``: what downstream tasks and the kNN monitor use."""
        return self.base_encoder.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised output of the base encoder's projector ``(N, dim)`` (before the predictor)."""
        return F.normalize(self.base_encoder(x), dim=1)

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Queries against the keys of every process: ``2T · CE(q·k_allᵀ / T, arange(N) + N·rank)``."""
        return moco_v3_loss(q, k, self.T)

    @torch.no_grad()
    def momentum_update(self, m: float | None = None) -> None:
        """One EMA step of every parameter of ``momentum_encoder`` towards ``base_encoder`` (BN buffers untouched).

        Called from :meth:`optimizer_step`, once per optimizer step, right after it.
        """
        momentum_update(self.base_encoder, self.momentum_encoder, self.current_momentum if m is None else m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
        """One MoCo v3 step as the official ``MoCo.forward``: update the momentum encoder with ``m``, return the loss.

        ``q1, q2 = predictor(base_encoder(x1)), predictor(base_encoder(x2))``; then, without gradients, the
        momentum update and ``k1, k2 = momentum_encoder(x1), momentum_encoder(x2)``; the loss is
        ``contrastive_loss(q1, k2) + contrastive_loss(q2, k1)``. (Training through Lightning does the momentum
        update in :meth:`optimizer_step` instead: the same sequence of weights.)
        """
        q1 = self.predictor(self.base_encoder(x1))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            self.momentum_update(m)
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        return self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)

    # ------------------------------------------------------------------ Lightning
    @property
    def bn_mode(self) -> str:
        """The concrete BN mode of ``bn``: ``"sync"`` or ``"none"``."""
        return "sync" if self.hparams.bn == "auto" else self.hparams.bn

    def setup(self, stage: str) -> None:
        """With ``bn="sync"`` under DDP, BatchNorm over the global batch everywhere (encoders and predictor).

        ``torch.nn.SyncBatchNorm`` on accelerators; on CPU processes, where it refuses to run, the all-reduce BN of
        :mod:`moco_lightning.bn` with the same statistics. One process needs nothing.
        """
        if stage == "fit" and self.bn_mode == "sync" and self.trainer.world_size > 1:
            convert_batchnorm(self, "sync", device_type=self.trainer.strategy.root_device.type)

    def step(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, torch.Tensor]:
        """One MoCo v3 step without the momentum update: the symmetric loss of two views.

        Returns ``loss`` (``contrastive_loss(q1, k2) + contrastive_loss(q2, k1)``), the base backbone's
        ``features`` of ``x1``, the predictions ``q1`` (with gradients) and the momentum encoder's keys ``k2``.
        Nothing in it reads a device value back to the host.
        """
        x1, x2 = to_layout(x1, self.memory_format), to_layout(x2, self.memory_format)
        features = self.base_encoder.backbone(x1)
        q1 = self.predictor(self.base_encoder.head(features))
        q2 = self.predictor(self.base_encoder(x2))
        with torch.no_grad():
            k1, k2 = self.momentum_encoder(x1), self.momentum_encoder(x2)
        loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        return {"loss": loss, "features": features, "q1": q1, "k2": k2}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """The symmetric loss of two views; ``batch`` is ``((x1, x2), labels)`` (labels unused by MoCo itself).

        The momentum encoder is the one updated after the previous optimizer step (see the class docstring).
        Returns the loss and, detached, for callbacks: backbone ``features``, ``labels`` and the queries ``q``
        (predictor output of the first view, not normalised).
        """
        (x1, x2), labels = batch[0], batch[1]
        out = self.step(x1, x2)
        loss, q1 = out["loss"], out["q1"]

        n = x1.shape[0]
        self.log("train/loss", loss, batch_size=n)
        self.log("train/acc_top1", batch_positive_accuracy(q1.detach(), out["k2"]), batch_size=n)
        self.log("train/lr", device_scalar(self, "lr", self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=n)
        return {"loss": loss, "features": out["features"].detach(), "labels": labels, "q": q1.detach()}

    def configure_optimizers(self) -> dict[str, Any]:
        """LARS / AdamW / SGD over the trainable parameters of the base encoder and the predictor, warm-up + cosine.

        The momentum encoder and a frozen patch projection are left out (they get no gradient).
        """
        hp = self.hparams
        params = [p for name, p in self.named_parameters()
                  if p.requires_grad and not name.startswith("momentum_encoder.")]
        return configure_optimization(
            self.trainer, params, optimizer=hp.optimizer, lr=hp.lr, scale_lr=hp.scale_lr,
            momentum=hp.optimizer_momentum, weight_decay=hp.weight_decay, lr_schedule=hp.lr_schedule,
            lr_interval=hp.lr_interval, lr_milestones=hp.lr_milestones, warmup_epochs=hp.warmup_epochs,
            trust_coefficient=hp.trust_coefficient, betas=hp.betas,
        )

