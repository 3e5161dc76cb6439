"""MoCo v1/v2 as a LightningModule: two encoders, a queue of keys, InfoNCE and a momentum update.

Read it top to bottom: :class:`MoCo` wires the small parts (:mod:`~moco_lightning.backbones`,
:mod:`~moco_lightning.heads`, :mod:`~moco_lightning.queue`, :mod:`~moco_lightning.ema`,
:mod:`~moco_lightning.losses`, :mod:`~moco_lightning.distributed`) and logs what a user watches.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from moco_lightning.backbones import build_backbone
from moco_lightning.distributed import shuffle_batch, unshuffle_batch, world_size
from moco_lightning.ema import cosine_momentum, momentum_update
from moco_lightning.heads import ProjectionHead
from moco_lightning.losses import info_nce_logits, info_nce_loss, positive_rank_accuracy
from moco_lightning.optim import LR_INTERVALS, configure_optimization, global_batch_size
from moco_lightning.queue import KeyQueue

MOMENTUM_SCHEDULES = ("constant", "cosine")


class Encoder(nn.Module):
    """A backbone followed by a projection head: images to (unnormalised) embeddings."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images ``(N, 3, H, W)`` into ``(N, dim)``."""
        return self.head(self.backbone(x))


class MoCo(L.LightningModule):
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
        shuffle_bn: shuffle the key batch across processes before the key encoder (Sec. 3.3); a no-op on one
            process.
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

    """

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
        shuffle_bn: bool = True,
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
    ) -> None:
        super().__init__()
        lr_milestones = tuple(float(e) for e in lr_milestones)  # plain types in checkpoints (not ListConfig)
        check_moco_args(dim=dim, queue_size=queue_size, momentum=momentum, temperature=temperature,
                        momentum_schedule=momentum_schedule, lr_interval=lr_interval)
        self.save_hyperparameters(ignore=["backbone"] if isinstance(backbone, nn.Module) else None)
        self.dim, self.K, self.m, self.T = dim, queue_size, momentum, temperature

        net, self.feature_dim = build_backbone(backbone, cifar_stem=cifar_stem, feature_dim=feature_dim)
        self.encoder_q = Encoder(net, ProjectionHead(self.feature_dim, dim, hidden_dim=hidden_dim, mlp=mlp))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.encoder_q.to(memory_format=self.memory_format)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)
        self.key_queue = KeyQueue(queue_size, dim)
        if compile:  # in place (nn.Module.compile): parameter names and checkpoints stay as without compile
            options = dict(compile) if isinstance(compile, dict) else {}
            self.encoder_q.backbone.compile(**options)
            self.encoder_k.backbone.compile(**options)
        self._device_scalars: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ names of the official builder
    @property
    def queue(self) -> torch.Tensor:
        """The dictionary ``(K, dim)``: one L2-normalised key per row."""
        return self.key_queue.queue

    @property
    def queue_ptr(self) -> torch.Tensor:
        """Index of the row the next batch of keys is written to."""
        return self.key_queue.ptr

    def momentum_at(self, step: int) -> float:
        """The momentum m of the key-encoder update that follows optimizer step number ``step`` (from 1)."""
        if self.hparams.momentum_schedule == "cosine" and self._trainer is not None:
            return cosine_momentum(step, int(self.trainer.estimated_stepping_batches), self.m)
        return self.m

    @property
    def current_momentum(self) -> float:
        """The momentum m of the last key-encoder update (of the next one, before the first step)."""
        return self.momentum_at(self.trainer.global_step if self._trainer is not None else 0)

    # ------------------------------------------------------------------ the algorithm, hook by hook
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features of the query encoder ``(N, D)``: what downstream tasks use."""
        return self.encoder_q.backbone(x)

    def encode_query(self, im_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: backbone features and normalised queries ``q`` of the first view (with gradients)."""
        features = self.encoder_q.backbone(im_q)
        q = F.normalize(self.encoder_q.head(features), dim=1)
        return features, q

    @torch.no_grad()
    def encode_key(self, im_k: torch.Tensor) -> torch.Tensor:
        """Hook: normalised keys ``k`` of the second view from the key encoder, with shuffled BN."""
        if self.hparams.shuffle_bn:
            im_k, idx_unshuffle = shuffle_batch(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            return unshuffle_batch(k, idx_unshuffle)
        return F.normalize(self.encoder_k(im_k), dim=1)

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
        """Hook: put this step's keys (gathered from every process) into the queue, dropping the oldest."""
        self.key_queue.enqueue(k)

    @torch.no_grad()
    def momentum_update(self, m: float | None = None) -> None:
        """Hook: one EMA step of every parameter of ``encoder_k`` towards ``encoder_q`` (BN buffers untouched).

        The module calls it from :meth:`optimizer_step`, once per optimizer step right after it (Algorithm 1 of
        the paper; the official code does the same update at the start of the next step), never per micro-batch
        of gradient accumulation.
        """
        momentum_update(self.encoder_q, self.encoder_k, self.current_momentum if m is None else m)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One MoCo step as the official builder computes it: ``(logits, labels)``, keys enqueued.

        ``logits`` is ``(N, 1 + K)`` divided by T with the positive in column 0; ``labels`` are zeros.
        """
        _, q = self.encode_query(im_q)
        k = self.encode_key(im_k)
        _, logits, labels = self.contrastive_loss(q, k)
        self.dequeue_and_enqueue(k)
        return logits, labels

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        """Contrast two views; ``batch`` is ``((x_q, x_k), labels)`` (labels unused by MoCo itself)."""
        (im_q, im_k), labels = batch[0], batch[1]
        fmt = self.memory_format  # channels-last with channels_last=True; a no-op when the batch already is
        im_q, im_k = im_q.contiguous(memory_format=fmt), im_k.contiguous(memory_format=fmt)
        features, q = self.encode_query(im_q)
        k = self.encode_key(im_k)
        loss, logits, targets = self.contrastive_loss(q, k)
        self.dequeue_and_enqueue(k)

        top1, top5 = positive_rank_accuracy(logits.detach(), (1, 5))  # on the device: no host read per step
        n = im_q.shape[0]
        self.log_dict(
            {
                "train/loss": loss,
                "train/acc_top1": top1,
                "train/acc_top5": top5,
                "train/pos_sim": logits[:, 0].mean().detach() * self.T,
                "train/neg_sim": logits[:, 1:].mean().detach() * self.T,
            },
            prog_bar=False,
            batch_size=n,
        )
        self.log("train/lr", self.device_scalar("lr", self.trainer.optimizers[0].param_groups[0]["lr"]), batch_size=n)
        return {"loss": loss, "features": features.detach(), "labels": labels}

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        """The optimizer step, then the key encoder's momentum update: once per optimizer step.

        Lightning calls this hook once per optimizer step (not per micro-batch of gradient accumulation) and
        before any callback's ``on_train_batch_end``, so a checkpoint written by a callback at any step holds a
        key encoder that has seen exactly as many updates as the query encoder has seen steps.
        """
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        m = self.momentum_at(self.trainer.global_step + 1)  # the step counter moves after this hook returns
        self.momentum_update(m)
        self.log("train/momentum", self.device_scalar("momentum", m))

    def on_train_start(self) -> None:
        """Check the queue against the loader before the first step: whole batches, K a multiple of them."""
        loader = self.trainer.train_dataloader
        if isinstance(loader, DataLoader) and loader.batch_size is not None:
            if not loader.drop_last:
                raise ValueError(
                    "the pretraining DataLoader must use drop_last=True: a short last batch would write a "
                    "partial batch of keys into the queue; set drop_last=True"
                )
            self.key_queue.check_batch(loader.batch_size * world_size())
            dataset_size = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
            if dataset_size is not None and self.K >= dataset_size:
                warnings.warn(
                    f"queue_size={self.K} is not smaller than the training set ({dataset_size} images): "
                    "the queue holds keys of the same images as the queries, so positives reappear among the "
                    "negatives; use a queue_size well below the dataset size",
                    stacklevel=2,
                )

    def device_scalar(self, name: str, value: float) -> torch.Tensor:
        """``value`` as a 0-d tensor on the module's device, refilled in place at every call.

        Logging a Python number makes Lightning copy it to the device with a blocking copy (a host-device sync per
        step on a GPU); filling a tensor that already lives there is a kernel launch like any other.
        """
        scalar = self._device_scalars.get(name)
        if scalar is None or scalar.device != self.device:
            scalar = self._device_scalars[name] = torch.zeros((), device=self.device)
        return scalar.fill_(value)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD over every trainable parameter but the key encoder's, with the lr schedule of the recipe."""
        hp = self.hparams
        params = [p for name, p in self.named_parameters() if p.requires_grad and not name.startswith("encoder_k.")]
        return configure_optimization(
            self.trainer, params, optimizer=hp.optimizer, lr=hp.lr, scale_lr=hp.scale_lr, momentum=hp.sgd_momentum,
            weight_decay=hp.weight_decay, lr_schedule=hp.lr_schedule, lr_interval=hp.lr_interval,
            lr_milestones=hp.lr_milestones, warmup_epochs=hp.warmup_epochs,
        )

    def global_batch_size(self) -> int:
        """Images per optimizer step over all processes: per-device batch × processes × accumulation."""
        return global_batch_size(self.trainer)


def check_moco_args(
    dim: int, queue_size: int, momentum: float, temperature: float, momentum_schedule: str = "constant",
    lr_interval: str = "epoch",
) -> None:
    """Raise a ``ValueError`` naming the setting when a MoCo hyper-parameter is out of range."""
    if dim < 1:
        raise ValueError(f"dim must be a positive embedding width, got dim={dim}")
    if queue_size < 1:
        raise ValueError(f"queue_size must be positive, got queue_size={queue_size}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] (the paper uses 0.999), got momentum={momentum}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (v1 uses 0.07, v2 0.2), got temperature={temperature}")
    if momentum_schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"momentum_schedule must be one of {MOMENTUM_SCHEDULES}, got {momentum_schedule!r}")
    if lr_interval not in LR_INTERVALS:
        raise ValueError(f"lr_interval must be one of {LR_INTERVALS}, got {lr_interval!r}")
