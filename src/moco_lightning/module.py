"""MoCo v1/v2 as a LightningModule: two encoders, a queue of keys, InfoNCE and a momentum update.

Read it top to bottom: :class:`MoCo` wires the small parts (:mod:`~moco_lightning.backbones`,
:mod:`~moco_lightning.heads`, :mod:`~moco_lightning.queue`, :mod:`~moco_lightning.ema`,
:mod:`~moco_lightning.losses`, :mod:`~moco_lightning.distributed`) and logs what a user watches.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from moco_lightning.backbones import build_backbone, check_backbone_name
from moco_lightning.bn import (
    DEFAULT_BN_SPLITS,
    SPLIT_MODES,
    check_bn_mode,
    check_no_lightning_sync_batchnorm,
    check_split_batch,
    convert_batchnorm,
    encode_shuffled,
    resolve_bn_mode,
)
from moco_lightning.distributed import world_size
from moco_lightning.ema import MOMENTUM_SCHEDULES, MomentumUpdateAfterStep, momentum_update
from moco_lightning.heads import Encoder, ProjectionHead
from moco_lightning.init_weights import check_init_from, init_backbone
from moco_lightning.lightning_internals import attached_trainer, lightning_sync_batchnorm
from moco_lightning.losses import info_nce_logits, info_nce_loss, positive_rank_accuracy
from moco_lightning.optim import LR_INTERVALS, configure_optimization
from moco_lightning.queue import KeyQueue, check_queue_size, queue_fit_warning
from moco_lightning.scalars import device_scalar
from moco_lightning.speed import compile_backbones, memory_format, to_layout

log = logging.getLogger(__name__)


def check_moco_args(
    dim: int = 128, queue_size: int = 65536, momentum: float = 0.999, temperature: float = 0.07,
    momentum_schedule: str = "constant",
    lr_interval: str = "epoch", bn: str = "auto", bn_splits: int = DEFAULT_BN_SPLITS,
    backbone: str | nn.Module = "resnet18",
) -> None:
    """Raise a ``ValueError`` when a MoCo hyper-parameter is out of range; its message starts with ``<name>=<value>``.

    The one place these ranges are written: the constructor calls it, and so does the training CLI on the config
    (prefixing ``model.``) before anything is built.
    """
    check_backbone_name(backbone)
    if dim < 1:
        raise ValueError(f"dim={dim} must be a positive embedding width (v1/v2 use 128)")
    if queue_size < 1:
        raise ValueError(f"queue_size={queue_size} must be a positive number of negative keys (v1/v2 use 65536)")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum={momentum} must be in [0, 1] (v1/v2 use 0.999)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (v1 uses 0.07, v2 0.2)")
    if momentum_schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"momentum_schedule={momentum_schedule} must be one of {', '.join(MOMENTUM_SCHEDULES)}")
    if lr_interval not in LR_INTERVALS:
        raise ValueError(f"lr_interval={lr_interval} must be one of {', '.join(LR_INTERVALS)}")
    check_bn_mode(bn)
    if not isinstance(bn_splits, int) or bn_splits < 1:
        raise ValueError(f"bn_splits={bn_splits} must be a positive number of BN groups (the demo uses 8)")


class MoCo(MomentumUpdateAfterStep, L.LightningModule):
    """Momentum Contrast (He et al. 2019, "MoCo v1"; Chen et al. 2020, "MoCo v2").

    The query encoder ``encoder_q`` learns by backprop; the key encoder ``encoder_k`` follows it as an
    exponential moving average once per optimizer step and never receives gradients. Each step contrasts the
    queries of one view with the keys of another view (positives) and with a queue of past keys (negatives).

    Defaults are MoCo v1 on ImageNet (dim 128, K 65,536, m 0.999, T 0.07, linear head, SGD lr 0.03 with ×0.1 at
    epochs 120 and 160). MoCo v2 is ``mlp=True, temperature=0.2, lr_schedule="cosine"``.

    Args:
        backbone: a name from :data:`moco_lightning.backbones.BACKBONES` or any module (see
            :func:`~moco_lightning.backbones.build_backbone`).
        dim: width of the embedding (C in the paper).
        queue_size: number of negative keys K; a multiple of the global batch size.
        momentum: m of the key encoder's moving average, in [0, 1]; the starting value for ``"cosine"``.
        temperature: T dividing the logits, > 0.
        mlp: a 2-layer MLP head (v2) instead of one linear layer (v1).
        hidden_dim: hidden width of the MLP head; the backbone width when ``None``.
        cifar_stem: 3x3 stride-1 stem without max-pool, for small images.
        feature_dim: width of a custom backbone's features (found by a dry forward when ``None``).
        bn: how BN sees the batch so that it cannot leak the positive (Sec. 3.3; :mod:`moco_lightning.bn`):
            ``"shuffle"`` across processes, ``"split"`` into ``bn_splits`` groups on one device with the key batch
            shuffled (the official CIFAR-10 demo), ``"sync"`` (SyncBatchNorm); the leaking ablations
            ``"split_noshuffle"`` (split's groups, no shuffle: the paper's per-GPU BN) and ``"none"`` (plain BN);
            ``"auto"`` is shuffle with several processes and split on one. Applied when training starts
            (:meth:`configure_bn`).
        bn_splits: groups of split BN (the demo emulates 8 GPUs); the per-device batch must be a multiple of it.
        symmetric: the loss in both directions, ``q1·k2`` and ``q2·k1`` each against the queue, summed, and both
            views' keys enqueued (the official CIFAR-10 demo's ``--symmetric``); K must then be a multiple of twice
            the global batch.
        momentum_schedule: ``"constant"`` or ``"cosine"`` (m rising to 1 over training, as in MoCo v3).
        optimizer: optimizer name (``"sgd"``).
        lr: learning rate, or the base lr per 256 images when ``scale_lr`` is on.
        sgd_momentum: momentum of SGD.
        weight_decay: weight decay, on every parameter as in the official code.
        lr_schedule: ``"step"``, ``"cosine"`` or ``"constant"``.
        lr_interval: ``"epoch"`` sets the lr once per epoch, as the official v1/v2 code; ``"step"`` moves it at
            every optimizer step.
        lr_milestones: epochs at which the ``"step"`` schedule multiplies the lr by 0.1.
        warmup_epochs: epochs of linear warm-up.
        scale_lr: use ``lr × global_batch / 256`` (global batch = per-device batch × processes × accumulation).
        channels_last: store the encoders' weights and the step's image batches channels-last (NHWC), the faster
            layout of convolutions on GPUs with tensor cores and on CPUs with oneDNN.
        compile: ``torch.compile`` the backbones of both encoders (compiled on the first step; the kNN monitor's
            eval-mode passes compile once more); ``True`` for the defaults, or a dict of ``torch.compile``
            keywords (``{"mode": "max-autotune"}``).
        init_from: a weights file to start the query backbone from (the key encoder is its copy; the heads start
            random): a torchvision or timm state dict, an official MoCo v1/v2/v3 checkpoint, or a checkpoint or
            export of this project (:mod:`moco_lightning.init_weights`). Read when the module is built; a resumed
            run's checkpoint then replaces these weights. ``load_from_checkpoint(path, init_from=None)`` rebuilds a
            trained module where the file is gone.

    """

    #: The range checks of the arguments: the constructor runs them, and the training CLI on the config.
    check_args = staticmethod(check_moco_args)
    #: The check that ``init_from`` fits the backbone (names and shapes only), run by the training CLI on the config.
    check_init_from = staticmethod(check_init_from)

    def __init__(
        self,
        backbone: str | nn.Module = "resnet18",
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.07,
        mlp: bool = False,
        hidden_dim: int | None = None,
        cifar_stem: bool = False,
        feature_dim: int | None = None,
        bn: str = "auto",
        bn_splits: int = DEFAULT_BN_SPLITS,
        symmetric: bool = False,
        momentum_schedule: str = "constant",
        optimizer: str = "sgd",
        lr: float = 0.03,
        sgd_momentum: float = 0.9,
        weight_decay: float = 1e-4,
        lr_schedule: str = "step",
        lr_interval: str = "epoch",
        lr_milestones: Sequence[float] = (120, 160),
        warmup_epochs: float = 0,
        scale_lr: bool = False,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        lr_milestones = tuple(float(e) for e in lr_milestones)  # plain types in checkpoints (not ListConfig)
        init_from = None if init_from is None else str(init_from)  # a str in the hyper-parameters, not a Path
        check_moco_args(dim=dim, queue_size=queue_size, momentum=momentum, temperature=temperature,
                        momentum_schedule=momentum_schedule, lr_interval=lr_interval, bn=bn, bn_splits=bn_splits,
                        backbone=backbone)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.dim, self.K, self.m, self.T = dim, queue_size, momentum, temperature

        net, self.feature_dim = build_backbone(backbone, cifar_stem=cifar_stem, feature_dim=feature_dim)
        if init_from is not None:
            init_backbone(net, init_from)  # before the key encoder is copied from the query encoder
        self.encoder_q = Encoder(net, ProjectionHead(self.feature_dim, dim, hidden_dim=hidden_dim, mlp=mlp))
        self.memory_format = memory_format(channels_last)
        self.encoder_q.to(memory_format=self.memory_format)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.key_queue = KeyQueue(queue_size, dim)
        self.bn_mode: str | None = None  # the concrete BN mode, set by configure_bn()
        compile_backbones([self.encoder_q, self.encoder_k], compile)  # in place: checkpoints keep their names

    # ------------------------------------------------------------------ names of the official builder
    @property
    def queue(self) -> torch.Tensor:
        """The dictionary ``(K, dim)``: one L2-normalised key per row."""
        return self.key_queue.queue

    @property
    def queue_ptr(self) -> torch.Tensor:
        """Index of the row the next batch of keys is written to."""
        return self.key_queue.ptr

    # ------------------------------------------------------------------ the algorithm, hook by hook
    def configure_bn(self, processes: int | None = None) -> str:
        """Resolve ``bn`` for ``processes`` processes (default: the running ones) and convert both encoders' BN.

        Called by Lightning's ``setup``; call it yourself before training in a plain PyTorch loop (``forward``
        does on first use). Returns the concrete mode. Idempotent; parameters keep their identity.
        """
        if self.bn_mode is None:
            processes = world_size() if processes is None else processes
            self.bn_mode = resolve_bn_mode(self.hparams.bn, processes)
            device_type = self.device.type if attached_trainer(self) is None else self.trainer.strategy.root_device.type
            for encoder in (self.encoder_q, self.encoder_k):
                convert_batchnorm(encoder, self.bn_mode, self.hparams.bn_splits, device_type)
        return self.bn_mode

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the query encoder ``(N, D)``: what downstream tasks use."""
        return self.encoder_q.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings of the query encoder ``(N, dim)`` (what the official CIFAR-10 demo's kNN uses)."""
        return F.normalize(self.encoder_q(x), dim=1)

    def encode_query(self, im_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: backbone features and normalised queries ``q`` of the first view (with gradients)."""
        features = self.encoder_q.backbone(im_q)
        q = F.normalize(self.encoder_q.head(features), dim=1)
        return features, q

    @torch.no_grad()
    def encode_key(self, im_k: torch.Tensor) -> torch.Tensor:
        """Hook: normalised keys ``k`` of the second view from the key encoder, the batch shuffled as ``bn`` says."""
        return F.normalize(encode_shuffled(self.encoder_k, im_k, self.configure_bn()), dim=1)

    def contrastive_loss(
        self, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Hook: InfoNCE of queries against their keys and the queue; returns ``(loss, logits, labels)``.

        The negatives are a snapshot of the queue as it was before this step's keys are enqueued: autograd
        keeps it for the backward pass, and the in-place enqueue must not change it underneath.
        """
        logits, labels = info_nce_logits(q, k, self.queue.clone().detach(), self.T)
        return info_nce_loss(logits, labels), logits, labels

    @torch.no_grad()
    def dequeue_and_enqueue(self, k: torch.Tensor) -> None:
        """Hook: put this step's keys (gathered from every process) into the queue, dropping the oldest.

        The keys are stamped with the optimizer step they belong to (from 1), for the key ages of the diagnostics.
        """
        self.key_queue.enqueue(k, step=self.global_step + 1 if attached_trainer(self) is not None else None)

    @torch.no_grad()
    def momentum_update(self, m: float | None = None) -> None:
        """Hook: one EMA step of every parameter of ``encoder_k`` towards ``encoder_q`` (BN buffers untouched).

        The module calls it from :meth:`optimizer_step`, once per optimizer step right after it (Algorithm 1 of
        the paper; the official code does the same update at the start of the next step), never per micro-batch
        of gradient accumulation.
        """
        momentum_update(self.encoder_q, self.encoder_k, self.current_momentum if m is None else m)

    def step(self, im_q: torch.Tensor, im_k: torch.Tensor) -> dict[str, torch.Tensor]:
        """One MoCo step: queries, keys, the loss against the queue, then this step's keys enqueued.

        Returns ``loss``, ``logits`` ``(N, 1 + K)`` (divided by T, positive in column 0), ``labels`` (zeros), the
        query backbone ``features`` and the normalised queries ``q`` (of the first direction). With ``symmetric``
        the two directions' losses are summed (as the official demo does), ``logits`` / ``labels`` stack both
        directions (``2N`` rows) and both views' keys are enqueued.
        """
        self.configure_bn()
        im_q, im_k = to_layout(im_q, self.memory_format), to_layout(im_k, self.memory_format)
        features, q = self.encode_query(im_q)
        k = self.encode_key(im_k)
        loss, logits, labels = self.contrastive_loss(q, k)
        keys = k
        if self.hparams.symmetric:
            _, q2 = self.encode_query(im_k)
            k1 = self.encode_key(im_q)
            loss_21, logits_21, labels_21 = self.contrastive_loss(q2, k1)  # the same queue as the first direction
            loss = loss + loss_21
            logits, labels = torch.cat([logits, logits_21]), torch.cat([labels, labels_21])
            keys = torch.cat([k1, k])
        self.dequeue_and_enqueue(keys)
        return {"loss": loss, "logits": logits, "labels": labels, "features": features, "q": q}

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoCo step as the official builder computes it: ``(logits, labels)``, keys enqueued (see :meth:`step`)."""
        out = self.step(im_q, im_k)
        return out["logits"], out["labels"]

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Contrast two views; ``batch`` is ``((x_q, x_k), labels)`` (labels unused by MoCo itself).

        Returns the loss and, detached, for callbacks: backbone ``features``, ``labels``, the ``logits`` and the
        normalised queries ``q`` of the first view.
        """
        (im_q, im_k), labels = batch[0], batch[1]
        out = self.step(im_q, im_k)
        loss, logits, features = out["loss"], out["logits"], out["features"]

        top1, top5 = positive_rank_accuracy(logits.detach(), (1, 5))  # on the device: no host read per step
        n = im_q.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log_dict(
            {
                "train/acc_top1": top1,
                "train/acc_top5": top5,
                "train/pos_sim": logits[:, 0].mean().detach() * self.T,
                "train/neg_sim": logits[:, 1:].mean().detach() * self.T,
            },
            prog_bar=False,
            batch_size=n,
        )
        self.log("train/lr", device_scalar(self, "lr", self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=n)
        return {"loss": loss, "features": features.detach(), "labels": labels, "logits": logits.detach(),
                "q": out["q"].detach()}

    def setup(self, stage: str) -> None:
        """Resolve the BN mode for the processes of this run, convert the encoders and say which mode runs."""
        check_no_lightning_sync_batchnorm(lightning_sync_batchnorm(self.trainer))
        mode = self.configure_bn(self.trainer.world_size)
        what = {
            "shuffle": "key batch shuffled across processes (paper Sec. 3.3)",
            "split": f"{self.hparams.bn_splits} BN groups per device and the key batch shuffled on the device "
                     "(official CIFAR-10 demo)",
            "sync": "SyncBatchNorm over all processes",
            "split_noshuffle": f"{self.hparams.bn_splits} BN groups per device and no shuffle: each query shares "
                               "its key's group, so BN statistics can leak the positive key (the paper's ablation)",
            "none": "plain per-process BN, no shuffle: BN statistics can leak the positive key",
        }[mode]
        message = f"MoCo BN mode: {mode} (bn={self.hparams.bn}, {self.trainer.world_size} process(es)): {what}"
        if mode == "shuffle" and self.trainer.world_size == 1:
            message += "; with one process shuffling does nothing, so BN can leak: consider bn=split"
        if self.trainer.is_global_zero:
            log.info(message)

    def on_train_start(self) -> None:
        """Check the queue against the loader before the first step: whole batches, K a multiple of them."""
        loader = self.trainer.train_dataloader
        if isinstance(loader, DataLoader) and loader.batch_size is not None:
            if not loader.drop_last:
                raise ValueError(
                    "the pretraining DataLoader must use drop_last=True: a short last batch would write a "
                    "partial batch of keys into the queue; set drop_last=True"
                )
            if self.bn_mode in SPLIT_MODES:
                check_split_batch(loader.batch_size, self.hparams.bn_splits, f"bn={self.hparams.bn}: split BN")
            symmetric = bool(self.hparams.symmetric)
            check_queue_size(self.K, loader.batch_size, world_size(), symmetric)
            dataset_size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
            message = queue_fit_warning(self.K, loader.batch_size * world_size() * (1 + symmetric), dataset_size)
            if message is not None:
                warnings.warn(message, stacklevel=2)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD over every trainable parameter but the key encoder's, with the lr schedule of the recipe."""
        hp = self.hparams
        params = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("encoder_k.")]
        return configure_optimization(
            self.trainer, params, optimizer=hp.optimizer, lr=hp.lr, scale_lr=hp.scale_lr, momentum=hp.sgd_momentum,
            weight_decay=hp.weight_decay, lr_schedule=hp.lr_schedule, lr_interval=hp.lr_interval,
            lr_milestones=hp.lr_milestones, warmup_epochs=hp.warmup_epochs,
        )
