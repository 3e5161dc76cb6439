"""How the encoders' batch normalisation sees a batch, so that BN statistics cannot leak the positive key.

With plain BN, the key encoder normalises the keys of a batch with statistics computed from those same images,
and the query encoder does the same for their other views: the model can lower the loss by matching batch
statistics instead of learning a representation (He et al. 2019, Sec. 3.3). The modes, one setting of the
module (``bn``):

* ``"shuffle"`` (the paper, many processes): the key images of all processes are gathered, shuffled and split
  again before the key encoder, so each process normalises its keys with statistics of other images than its
  queries (:func:`moco_lightning.distributed.shuffle_batch`). On one process it does nothing.
* ``"split"`` (one device, the official CIFAR-10 demo): every BN layer of both encoders normalises ``bn_splits``
  groups of the batch separately (:class:`SplitBatchNorm2d`, emulating ``bn_splits`` GPUs) and the key batch is
  shuffled on the device before the key encoder, so a query and its key fall into different groups.
* ``"sync"`` (MoCo v3): statistics over the global batch of all processes (``SyncBatchNorm``).
* ``"split_noshuffle"``: the groups of ``"split"`` without the shuffle, so every query and its key share a group:
  the paper's leaking baseline (per-GPU BN of a few dozen images, no shuffle) emulated on one device (an ablation).
* ``"none"``: plain per-process BN, the leak included (an ablation; on one device the whole batch is one group, so
  its statistics leak less than the paper's per-GPU groups).

``"auto"`` (the default) picks ``"shuffle"`` when there is more than one process and ``"split"`` on one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from moco_lightning.distributed import is_distributed, shuffle_batch, unshuffle_batch

__all__ = [
    "BN_MODES",
    "DEFAULT_BN_SPLITS",
    "AllReduceBatchNorm1d",
    "AllReduceBatchNorm2d",
    "SPLIT_MODES",
    "SplitBatchNorm2d",
    "check_bn_mode",
    "check_no_lightning_sync_batchnorm",
    "check_split_batch",
    "convert_batchnorm",
    "encode_shuffled",
    "resolve_bn_mode",
]

#: Values of the ``bn`` setting.
BN_MODES = ("auto", "shuffle", "split", "sync", "split_noshuffle", "none")
#: The modes that normalise ``bn_splits`` groups of the per-device batch separately.
SPLIT_MODES = ("split", "split_noshuffle")
#: Groups of split BN: the official CIFAR-10 demo emulates 8 GPUs.
DEFAULT_BN_SPLITS = 8


def check_bn_mode(mode: str, modes: tuple[str, ...] = BN_MODES, model: str = "MoCo", hint: str = "") -> None:
    """Raise a ``ValueError`` (``bn=<mode> is not a BN mode of <model>; choose one of ...``) unless in ``modes``."""
    if mode not in modes:
        raise ValueError(f"bn={mode} is not a BN mode of {model}; choose one of {', '.join(modes)}{hint}")


def check_no_lightning_sync_batchnorm(sync_batchnorm: bool) -> None:
    """Refuse Lightning's ``sync_batchnorm=True``: it converts every BatchNorm and undoes MoCo's own BN handling."""
    if sync_batchnorm:
        raise ValueError("trainer.sync_batchnorm=true converts every BatchNorm, which undoes MoCo's own BN handling; "
                         "set trainer.sync_batchnorm=false and model.bn=sync (or keep model.bn=auto: shuffle BN on "
                         "many processes)")


def check_split_batch(batch_size: int, bn_splits: int, reason: str = "model.bn=split") -> None:
    """Split BN normalises ``batch_size / bn_splits`` images per group: refuse a batch that does not divide."""
    if batch_size % bn_splits != 0:
        raise ValueError(f"data.batch_size={batch_size} must be a multiple of model.bn_splits={bn_splits} ({reason}: "
                         "each of the groups normalises batch/bn_splits images); change data.batch_size or "
                         "model.bn_splits")


def resolve_bn_mode(mode: str, world_size: int) -> str:
    """The concrete mode of ``mode`` for ``world_size`` processes (``"auto"``: shuffle on many, split on one)."""
    check_bn_mode(mode)
    if mode == "auto":
        return "shuffle" if world_size > 1 else "split"
    return mode


def _momentum_factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """The running-statistics update factor of a BN layer in training mode (and count the batch), as BatchNorm does."""
    if not bn.track_running_stats or bn.num_batches_tracked is None:
        return 0.0 if bn.momentum is None else bn.momentum
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:  # cumulative average
        return 1.0 / float(bn.num_batches_tracked)
    return bn.momentum


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that normalises ``num_splits`` groups of the batch separately in training mode.

    Sample ``n`` belongs to group ``n % num_splits`` (the batch viewed as ``(N / S, S·C, H, W)``, the official
    CIFAR-10 demo's trick: one ``batch_norm`` call, no copy for contiguous inputs). Each group updates its own copy
    of the running statistics and the copies are averaged, so the running statistics are those of ``num_splits``
    GPUs of ``N / S`` images each. In eval mode it is an ordinary BatchNorm2d; its state dict is BatchNorm2d's.

    Args:
        num_features: channels C.
        num_splits: groups S; the batch size must be a multiple of it.
        **kwargs: the other ``nn.BatchNorm2d`` arguments.

    """

    def __init__(self, num_features: int, num_splits: int = DEFAULT_BN_SPLITS, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if num_splits < 1:
            raise ValueError(f"bn_splits must be a positive number of groups, got {num_splits}")
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise each group with its own batch statistics (training) or with the running ones (eval)."""
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        n, c, h, w = input.shape
        s = self.num_splits
        if n % s != 0:
            raise ValueError(
                f"split BatchNorm needs a batch that is a multiple of bn_splits={s}, got a batch of {n}; "
                "change data.batch_size or model.bn_splits"
            )
        factor = _momentum_factor(self)
        running_mean = self.running_mean.repeat(s) if self.running_mean is not None else None
        running_var = self.running_var.repeat(s) if self.running_var is not None else None
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        grouped = input.contiguous().view(n // s, s * c, h, w)  # channels_last inputs are copied once here
        out = F.batch_norm(grouped, running_mean, running_var, weight, bias, True, factor, self.eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(s, c).mean(0))
                self.running_var.copy_(running_var.view(s, c).mean(0))
        return out.view(n, c, h, w)

    def extra_repr(self) -> str:
        """Shown in ``repr``."""
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class _AllReduceSum(torch.autograd.Function):
    """Sum a tensor over all processes; the gradient of every process's input is the summed gradient."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:  # noqa: D102
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _all_reduce_batch_norm(bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """BatchNorm of ``input`` with the statistics of the batches of every process (training mode)."""
    factor = _momentum_factor(bn)
    x = input.to(torch.promote_types(input.dtype, torch.float32))  # half precision: statistics in float32
    dims = (0, *range(2, x.dim()))  # every dimension but the channels
    count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
    stats = _AllReduceSum.apply(torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims), count]))
    c = x.shape[1]
    total = stats[-1]
    mean = stats[:c] / total
    var = stats[c : 2 * c] / total - mean * mean
    shape = (1, c) + (1,) * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.weight is not None:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            unbiased = var.detach() * total / (total - 1).clamp(min=1)
            bn.running_mean.lerp_(mean.detach().to(bn.running_mean.dtype), factor)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)
    return out.to(input.dtype)


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the global batch of all processes, for processes on the CPU.

    ``torch.nn.SyncBatchNorm`` only runs on accelerators; this layer gives CPU processes (gloo) the same statistics:
    per-channel sums of ``x`` and ``x²`` and the sample count are all-reduced (with gradients), the batch is
    normalised with the global mean and (biased) variance and the running statistics follow the global batch with
    the unbiased variance, as SyncBatchNorm does. Outside ``torch.distributed`` it is an ordinary BatchNorm2d.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with the statistics of the batches of every process (training) or the running ones (eval)."""
        return _all_reduce_batch_norm(self, input) if self.training and is_distributed() else super().forward(input)


class AllReduceBatchNorm1d(nn.BatchNorm1d):
    """:class:`AllReduceBatchNorm2d` for ``(N, C)`` / ``(N, C, L)`` inputs (the BN of MoCo v3's MLP heads)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise with the statistics of the batches of every process (training) or the running ones (eval)."""
        return _all_reduce_batch_norm(self, input) if self.training and is_distributed() else super().forward(input)


def _replace(module: nn.Module, makes: dict[type, type], **kwargs: object) -> nn.Module:
    """Replace each plain BN layer of a type in ``makes`` by its counterpart, keeping its parameters and buffers."""
    make = makes.get(type(module))
    if make is not None:
        new = make(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                   track_running_stats=module.track_running_stats, **kwargs)
        new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        replaced = _replace(child, makes, **kwargs)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def convert_batchnorm(
    module: nn.Module, mode: str, num_splits: int = DEFAULT_BN_SPLITS, device_type: str = "cpu"
) -> nn.Module:
    """Turn the BatchNorm layers of ``module`` into the layers that ``mode`` needs; returns the module.

    ``"split"`` and ``"split_noshuffle"``: each ``BatchNorm2d`` a :class:`SplitBatchNorm2d`; ``"sync"``: every
    BatchNorm a ``torch.nn.SyncBatchNorm`` when the run's device (``device_type``) is an accelerator, an
    :class:`AllReduceBatchNorm2d` / :class:`AllReduceBatchNorm1d` on the CPU; ``"shuffle"`` and ``"none"`` keep
    plain BatchNorm.
    Parameters and buffers are the same tensors as before (an optimizer built earlier keeps working) and the state
    dict keeps its keys, so checkpoints load into either form.
    """
    if mode not in BN_MODES or mode == "auto":
        raise ValueError(f"convert_batchnorm needs a concrete mode (resolve_bn_mode resolves 'auto'), got {mode!r}")
    if mode in SPLIT_MODES:
        return _replace(module, {nn.BatchNorm2d: SplitBatchNorm2d}, num_splits=num_splits)
    if mode == "sync":
        if device_type != "cpu":
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return _replace(module, {nn.BatchNorm2d: AllReduceBatchNorm2d, nn.BatchNorm1d: AllReduceBatchNorm1d})
    return module


@torch.no_grad()
def encode_shuffled(encoder: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``encoder(x)`` with the batch shuffled as ``mode`` needs, outputs returned in the order of ``x``.

    ``"shuffle"``: across processes (:func:`~moco_lightning.distributed.shuffle_batch`; nothing on one process).
    ``"split"``: on this device, one ``randperm`` before the encoder and its inverse after (the official CIFAR-10
    demo), so that a query and its key land in different BN groups. ``"sync"``, ``"split_noshuffle"`` and
    ``"none"``: no shuffle.
    """
    if mode == "shuffle":
        shuffled, idx_unshuffle = shuffle_batch(x)
        return unshuffle_batch(encoder(shuffled), idx_unshuffle)
    if mode == "split":
        idx_shuffle = torch.randperm(x.shape[0], device=x.device)
        return encoder(x[idx_shuffle])[torch.argsort(idx_shuffle)]
    return encoder(x)
