"""How the encoders' batch normalisation sees a batch, so that BN statistics cannot leak the positive key.

With plain BN a key is normalised with statistics of the same images whose other views are the queries, and the
model can lower the loss by matching batch statistics (He et al. 2019, Sec. 3.3). The modes (``bn``):

* ``"shuffle"`` (the paper, many processes): the key images of all processes are gathered, shuffled and split
  again before the key encoder (:func:`moco_lightning.distributed.shuffle_batch`); on one process it does nothing.
* ``"split"`` (one device, the official CIFAR-10 demo): every BN layer normalises ``bn_splits`` groups separately
  (:class:`SplitBatchNorm2d`, emulating ``bn_splits`` GPUs) and the keys are shuffled on the device first.
* ``"sync"`` (MoCo v3): statistics over the global batch (``SyncBatchNorm``).
* ``"split_noshuffle"``: ``"split"``'s groups without the shuffle: the paper's leaking baseline (an ablation).
* ``"none"``: plain per-process BN, the leak included (an ablation; one device's whole batch leaks less than the
  paper's per-GPU groups).

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
    "AllReduceBatchNormAct2d",
    "SPLIT_MODES",
    "SplitBatchNorm2d",
    "SplitBatchNormAct2d",
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
        raise ValueError("the Trainer's sync_batchnorm=True converts every BatchNorm, which undoes MoCo's own BN "
                         "handling; set sync_batchnorm=False and the module's bn=sync (or keep bn=auto: shuffle BN on "
                         "many processes)")


def check_split_batch(batch_size: int, bn_splits: int, reason: str = "bn=split") -> None:
    """Split BN normalises ``batch_size / bn_splits`` images per group: refuse a batch that does not divide."""
    if batch_size % bn_splits != 0:
        raise ValueError(f"batch_size={batch_size} must be a multiple of bn_splits={bn_splits} ({reason}: "
                         "each of the groups normalises batch_size / bn_splits images); change batch_size or "
                         "bn_splits")


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
    CIFAR-10 demo's trick: one ``batch_norm`` call, no copy for contiguous inputs; channels-last inputs are normalised
    in place of layout, NHWC in and NHWC out, with per-group statistics). Each group updates its own copy
    of the running statistics and the copies are averaged, so the running statistics are those of ``num_splits``
    GPUs of ``N / S`` images each. In eval mode it is an ordinary BatchNorm2d; its state dict is BatchNorm2d's.
    The batch size must be a multiple of ``num_splits``; ``**kwargs`` go to ``nn.BatchNorm2d``.
    """

    def __init__(self, num_features: int, num_splits: int = DEFAULT_BN_SPLITS, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        if num_splits < 1:
            raise ValueError(f"num_splits={num_splits} must be a positive number of BN groups")
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Normalise each group with its own batch statistics (training) or with the running ones (eval)."""
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        n, c, h, w = input.shape
        s = self.num_splits
        if n % s != 0:
            raise ValueError(
                f"split BatchNorm needs a batch that is a multiple of num_splits={s}, got a batch of {n}; "
                "change the batch size or num_splits"
            )
        factor = _momentum_factor(self)
        if _is_channels_last(input):
            return self._forward_channels_last(input, factor)
        running_mean = self.running_mean.repeat(s) if self.running_mean is not None else None
        running_var = self.running_var.repeat(s) if self.running_var is not None else None
        weight = self.weight.repeat(s) if self.weight is not None else None
        bias = self.bias.repeat(s) if self.bias is not None else None
        grouped = input.contiguous().view(n // s, s * c, h, w)  # no copy: contiguous inputs (and others: one copy)
        out = F.batch_norm(grouped, running_mean, running_var, weight, bias, True, factor, self.eps)
        if running_mean is not None and running_var is not None:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(s, c).mean(0))
                self.running_var.copy_(running_var.view(s, c).mean(0))
        return out.view(n, c, h, w)

    def _forward_channels_last(self, input: torch.Tensor, factor: float) -> torch.Tensor:
        """Training-mode split BN of a channels-last (NHWC) batch, output channels-last, with no layout copy.

        In NHWC memory the group and the channel are not adjacent, so the ``(N / S, S·C, H, W)`` view of the
        contiguous path does not exist and ``batch_norm`` would need an NCHW copy (and the next convolution a copy
        back). Here the batch is viewed as ``(N / S, S, C, H, W)`` (a view in any layout), the statistics of each
        (group, channel) are reduced over the images of the group and the pixels, and the normalisation is one
        multiply-add, which keeps the input's layout. Equal to the contiguous path up to float rounding.
        """
        n, c, h, w = input.shape
        s = self.num_splits
        grouped = input.view(n // s, s, c, h, w)  # sample n is in group n % s, as in the contiguous path
        stats = grouped if grouped.dtype in (torch.float32, torch.float64) else grouped.float()  # half: fp32 stats
        var, mean = torch.var_mean(stats, dim=(0, 3, 4), correction=0)  # (S, C) each
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        dtype = input.dtype if input.dtype in (torch.float32, torch.float64) else scale.dtype
        out = torch.addcmul(shift.view(1, s, c, 1, 1).to(dtype), grouped.to(dtype), scale.view(1, s, c, 1, 1).to(dtype))
        if self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                count = n // s * h * w
                unbiased = var * (count / max(count - 1, 1))
                self.running_mean.lerp_(mean.mean(0).to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.mean(0).to(self.running_var.dtype), factor)
        return out.to(input.dtype).view(n, c, h, w)

    def extra_repr(self) -> str:
        """Shown in ``repr``."""
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def _is_channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is stored NHWC and not also NCHW-contiguous (where the grouped view needs no copy)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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


class _ThenAct(nn.Module):
    """The drop and activation that timm's ``BatchNormAct2d`` applies after its BN, after this layer's BN."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.drop: nn.Module = nn.Identity()  # convert_batchnorm puts the replaced layer's own here
        self.act: nn.Module = nn.Identity()

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.act(self.drop(super().forward(input)))  # type: ignore[misc]


class SplitBatchNormAct2d(_ThenAct, SplitBatchNorm2d):
    """:class:`SplitBatchNorm2d` in place of a timm ``BatchNormAct2d`` (MobileNetV3, EfficientNet): its act kept."""


class AllReduceBatchNormAct2d(_ThenAct, AllReduceBatchNorm2d):
    """:class:`AllReduceBatchNorm2d` in place of a timm ``BatchNormAct2d``: its drop and activation kept."""


def _timm_bn_act() -> type | None:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # timm is a dependency; a trimmed install has no timm models to convert either
        return None
    return BatchNormAct2d


def _replace(module: nn.Module, makes: dict[type, type], **kwargs: object) -> nn.Module:
    """Replace each BN layer of a type in ``makes`` by its counterpart, keeping its parameters and buffers.

    The types are matched exactly: a subclass that is not in ``makes`` is kept as it is.
    """
    make = makes.get(type(module))
    if make is not None:
        new = make(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                   track_running_stats=module.track_running_stats, **kwargs)
        if isinstance(new, _ThenAct):
            new.drop, new.act = module.drop, module.act
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
    plain BatchNorm. timm's ``BatchNormAct2d`` (BN, then its activation) becomes :class:`SplitBatchNormAct2d`,
    :class:`AllReduceBatchNormAct2d` or timm's ``SyncBatchNormAct``, its activation kept.
    Parameters and buffers are the same tensors as before (an optimizer built earlier keeps working) and the state
    dict keeps its keys, so checkpoints load into either form.
    """
    if mode not in BN_MODES or mode == "auto":
        raise ValueError(f"convert_batchnorm needs a concrete mode (resolve_bn_mode resolves 'auto'), got {mode!r}")
    bn_act = _timm_bn_act()
    if mode in SPLIT_MODES:
        makes: dict[type, type] = {nn.BatchNorm2d: SplitBatchNorm2d}
        return _replace(module, {**makes, bn_act: SplitBatchNormAct2d} if bn_act else makes, num_splits=num_splits)
    if mode == "sync":
        if device_type != "cpu":
            if bn_act is not None:  # timm's conversion keeps BatchNormAct2d's activation (SyncBatchNormAct)
                from timm.layers import convert_sync_batchnorm

                return convert_sync_batchnorm(module)
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        makes = {nn.BatchNorm2d: AllReduceBatchNorm2d, nn.BatchNorm1d: AllReduceBatchNorm1d}
        return _replace(module, {**makes, bn_act: AllReduceBatchNormAct2d} if bn_act else makes)
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
