"""Embedding a dataset with a frozen encoder: eval mode, sharded feature extraction, whether there are labels.

Shared by the kNN metric and monitor (:mod:`~moco_lightning.eval.knn`), the linear probe on features
(:mod:`~moco_lightning.eval.linear_features`), the embedding map and the representation diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from moco_lightning import distributed

__all__ = ["eval_mode", "extract_features", "has_labels", "monitor_pass"]


@contextmanager
def eval_mode(module: torch.nn.Module | None) -> Iterator[None]:
    """Put every submodule of ``module`` in eval mode for the block, then give each its own previous mode back."""
    if module is None:
        yield
        return
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@contextmanager
def monitor_pass(trainer: Any, pl_module: torch.nn.Module) -> Iterator[None]:
    """A monitor's pass over a training module: eval mode, the trainer's precision context and a private RNG state.

    The RNG state is forked because creating loader iterators (and drawing views) takes from the global generators:
    a monitor must not change the random stream (augmentations, shuffles) of the run it watches.
    """
    plugin = getattr(trainer, "precision_plugin", None)
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    with (eval_mode(pl_module), plugin.forward_context() if plugin is not None else nullcontext(),
          torch.random.fork_rng(devices=devices)):
        yield


def has_labels(datamodule: Any) -> bool:
    """Whether a datamodule's evaluation sets carry labels (``datamodule.has_labels``; ``True`` when it has none)."""
    return bool(getattr(datamodule, "has_labels", True)) if datamodule is not None else True


def _distributed_loader(loader: DataLoader) -> tuple[DataLoader, torch.Tensor]:
    """Give this process its shard of ``loader``'s dataset, in order, and the dataset indices of that shard.

    The :class:`DistributedSampler` pads the dataset with repeats of its first samples so every process gets
    the same number; the returned indices let the caller put gathered features back in dataset order, where
    the repeats land on the same slot and disappear.
    """
    sampler = DistributedSampler(
        loader.dataset, num_replicas=distributed.world_size(), rank=distributed.rank(), shuffle=False
    )
    shard = DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
    return shard, torch.tensor(list(sampler), dtype=torch.long)


@torch.no_grad()
def extract_features(
    embed_fn: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[Any],
    device: torch.device | str | None = None,
    shard: bool = True,
    gather: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every ``(x, y)`` batch of ``loader``; returns float32 features ``(N, D)`` and labels ``(N,)``.

    Under ``torch.distributed`` with ``shard=True`` and a map-style :class:`DataLoader`, each process embeds
    only its shard. With ``gather=True`` the features of all processes are gathered, so every process returns the
    whole dataset in dataset order (the sampler's padding duplicates are dropped); with ``gather=False`` each
    process returns its own shard, without duplicates (a sharded kNN bank). Call it on every process then.
    ``embed_fn`` is called under ``torch.no_grad``; put the model in eval mode yourself.
    """
    device = torch.device(device) if device is not None else None
    indices = None
    # map-style loader with plain batching: shard it; anything else is embedded whole on every process
    map_style = isinstance(loader, DataLoader) and hasattr(loader.dataset, "__len__") and loader.batch_size is not None
    if shard and map_style and distributed.is_distributed():
        num_samples = len(loader.dataset)
        loader, indices = _distributed_loader(loader)
    feats, labels = [], []
    for batch in loader:
        x, y = batch[0], batch[1]
        if device is not None:
            x = x.to(device, non_blocking=True)
        feats.append(embed_fn(x).float())
        labels.append(torch.as_tensor(y).to(feats[-1].device))
    if not feats:
        raise ValueError("the loader yielded no batches; check the dataset is set up and not empty")
    features, targets = torch.cat(feats), torch.cat(labels).long()
    if indices is None:
        return features, targets
    if not gather:  # this process's shard; the padding repeats the first samples after position num_samples
        padded_positions = torch.arange(distributed.rank(), len(indices) * distributed.world_size(),
                                        distributed.world_size())
        keep = (padded_positions < num_samples).to(features.device)
        return features[keep], targets[keep]
    indices = indices.to(features.device)
    all_feats = distributed.concat_all_gather(features)
    all_labels = distributed.concat_all_gather(targets)
    all_idx = distributed.concat_all_gather(indices)
    out_feats = features.new_empty(num_samples, features.shape[1])
    out_labels = targets.new_empty(num_samples)
    out_feats[all_idx] = all_feats
    out_labels[all_idx] = all_labels
    return out_feats, out_labels
