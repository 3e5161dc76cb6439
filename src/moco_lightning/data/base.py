"""The base datamodule: two-view pretraining batches and labelled single-view evaluation batches."""

from __future__ import annotations

import hashlib
import random
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from moco_lightning.cpus import auto_workers, slurm_task_cpus  # the CPUs a process has: counted in one place
from moco_lightning.data.batch_augment import BatchTwoViewAugmentation, build_batch_augmentation
from moco_lightning.lightning_internals import batches_fetched
from moco_lightning.transforms import (
    AUGMENTATIONS,
    DATASET_STATS,
    DEFAULT_IMAGE_SIZE,
    TwoViewTransform,
    build_view_transforms,
    eval_transform,
    linear_train_transform,
)

__all__ = ["DatasetError", "MoCoDataModule", "TensorImageDataset", "TransformedDataset", "auto_workers",
           "check_data_args", "seed_worker", "slurm_task_cpus"]


class DatasetError(ValueError):
    """The data on disk cannot be trained on (an empty folder, fewer images than one batch...); says what to fix."""


def batch_seed(seed: int, rank: int, index: int) -> int:
    """A 32-bit seed for the augmentation of batch ``index`` on process ``rank`` of a run seeded with ``seed``.

    Hashed (BLAKE2b) so nearby inputs get unrelated streams; 32 bits because torch's CPU generator keeps only those.
    """
    digest = hashlib.blake2b(f"moco-lightning/{seed}/{rank}/{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed ``random`` and ``numpy`` of a loader worker from its torch seed."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class TensorImageDataset(Dataset):
    """Images held as one tensor ``(N, C, H, W)``: ``dataset[i] = (images[i], labels[i])``, no transform.

    Args:
        images: image tensor (uint8 or float in ``[0, 1]``); a grey image may be an expanded view of one channel.
        labels: ``(N,)`` int64 class indices.

    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"TensorImageDataset: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])


class TransformedDataset(Dataset):
    """Apply ``transform`` to the image of ``base[i] = (image, label)``; shares the base data between views.

    Args:
        base: a dataset returning ``(image, label)`` pairs (PIL images or tensors), without its own transform.
        transform: applied to the image; ``None`` returns it unchanged.
        cache: keep each transformed item after first use (a deterministic ``transform``); switched off when the
            whole set would take more than :attr:`CACHE_BYTES`.

    """

    #: largest cache (estimated from the first item x the length): the digits' 1,797 16-px views take 5.5 MB
    CACHE_BYTES: ClassVar[int] = 512 * 2**20

    def __init__(self, base: Dataset, transform: Callable[[Any], Any] | None, cache: bool = False) -> None:
        self.base = base
        self.transform = transform
        self.cache = cache
        self._items: dict[int, tuple[Any, Any]] = {}

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if index in self._items:
            return self._items[index]
        image, label = self.base[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.cache and not self._items:  # the first item decides
            self.cache = (isinstance(image, torch.Tensor)
                          and image.numel() * image.element_size() * len(self) <= self.CACHE_BYTES)
        if self.cache:
            self._items[index] = (image, label)
        return image, label


def check_data_args(batch_size: int = 256, eval_batch_size: int | None = None, num_workers: int | str = 4,
                    image_size: int | None = None, augmentation: str | Callable[[Any], torch.Tensor] | None = None,
                    batch_augmentation: bool = True, mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None) -> None:
    """Raise a ``ValueError`` starting ``<name>=<value>`` when a datamodule setting is out of range (the one place)."""
    def positive(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1

    if not positive(batch_size):
        raise ValueError(f"batch_size={batch_size!r} must be a positive number of images per device")
    if eval_batch_size is not None and not positive(eval_batch_size):
        raise ValueError(f"eval_batch_size={eval_batch_size!r} must be a positive number of images per device, or "
                         "null (the training batch size)")
    if num_workers != "auto" and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers={num_workers} must be an integer >= 0 (0 = load in the training process) or "
                         "auto (one per CPU core the process may use)")
    if image_size is not None and not positive(image_size):
        raise ValueError(f"image_size={image_size!r} must be a positive number of pixels (224 for ImageNet-sized "
                         "photos, 32 to 96 for small images) or null (the dataset's default)")
    if isinstance(augmentation, str) and augmentation not in AUGMENTATIONS:
        raise ValueError(f"augmentation={augmentation} is not a known augmentation; use one of "
                         f"{', '.join(AUGMENTATIONS)} or a callable transform")
    if batch_augmentation and callable(augmentation):
        raise ValueError(f"batch_augmentation=true needs a named augmentation ({', '.join(AUGMENTATIONS)}); set "
                         "batch_augmentation=false to apply a callable per image")
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and len(value) != 3:
            raise ValueError(f"{key}={list(value)} must have 3 values (RGB)")


class MoCoDataModule(LightningDataModule):
    """Base datamodule for MoCo: pretraining pairs ``((x_q, x_k), y)`` and evaluation batches ``(x, y)``.

    Subclasses set :attr:`dataset_name` and implement :meth:`_build_pretrain_dataset` and
    :meth:`_build_eval_dataset` (both return datasets of ``(image, label)`` *without* transform). Pretraining batches
    are shuffled with ``drop_last=True`` (every batch fills the queue at full size); the evaluation loaders give one
    deterministic view in a fixed order; there is no ``val_dataloader``.

    Reproducibility: the pretraining order is drawn from ``(seed, epoch)`` and split between processes
    (``StatefulDistributedSampler``), and the ``StatefulDataLoader``'s position is saved in every checkpoint, so a
    resumed run continues with the epoch's remaining batches in the same order. With ``num_workers=0`` per-image
    augmentations draw from the global RNG: seed it with ``lightning.seed_everything``. Batch augmentation draws from a
    generator seeded per batch (:meth:`augment_batch`).

    Args:
        batch_size: pretraining batch size per device (per process).
        num_workers: loader worker processes per device, or ``"auto"`` (:func:`auto_workers`).
        pin_memory: pin host memory; ``None`` = when the batches go to a CUDA device (:attr:`pin_memory`).
        persistent_workers: keep workers alive between epochs; ``None`` = when ``num_workers > 0``.
        seed: seed of the loader generators (shuffle order, worker seeds).
        augmentation: a name of :data:`~moco_lightning.transforms.AUGMENTATIONS`, or a callable view transform;
            ``None`` = the dataset's default.
        image_size: crop size; ``None`` = the dataset's default.
        mean: normalisation mean; ``None`` = the dataset's statistics.
        std: normalisation std; ``None`` = the dataset's statistics.
        augmentation_kwargs: extra keywords for the augmentation builder, e.g. ``{"blur_prob": 0.0}``.
        eval_batch_size: batch size of the evaluation loaders; ``None`` = ``batch_size``.
        prefetch_factor: batches prefetched per worker (``None`` = PyTorch's default); ignored without workers.
        batch_augmentation: augment whole batches on the training device (:mod:`moco_lightning.data.batch_augment`)
            instead of each image in the loader; needs a named ``augmentation``.

    """

    #: key into :data:`~moco_lightning.transforms.DATASET_STATS` / ``DEFAULT_IMAGE_SIZE``.
    dataset_name: ClassVar[str] = "folder"
    #: augmentation used when ``augmentation=None``.
    default_augmentation: ClassVar[str] = "v2"
    #: whether all images have one size (in-memory / fixed-size datasets): the batch augmentation then crops on the
    #: device; otherwise the loader takes the random resized crops.
    fixed_image_size: ClassVar[bool] = True
    #: The range checks of the arguments: the constructor runs them, and the training CLI on the config.
    check_args = staticmethod(check_data_args)

    def __init__(self, batch_size: int = 256, num_workers: int | str = 4, pin_memory: bool | None = None,
                 persistent_workers: bool | None = None, seed: int = 0,
                 augmentation: str | Callable[[Any], torch.Tensor] | None = None, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augmentation_kwargs: dict[str, Any] | None = None, eval_batch_size: int | None = None,
                 prefetch_factor: int | None = None, batch_augmentation: bool = True) -> None:
        super().__init__()
        check_data_args(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                        image_size=image_size, augmentation=augmentation, batch_augmentation=batch_augmentation,
                        mean=mean, std=std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size if eval_batch_size is not None else batch_size
        self.num_workers_setting: int | str = num_workers
        self.pin_memory_setting: bool | None = None if pin_memory is None else bool(pin_memory)
        self.persistent_workers_setting = persistent_workers
        self.prefetch_factor = prefetch_factor
        self.seed = int(seed)
        self.augmentation = augmentation if augmentation is not None else self.default_augmentation
        self.augmentation_kwargs = dict(augmentation_kwargs or {})
        self.image_size: int = image_size if image_size is not None else DEFAULT_IMAGE_SIZE[self.dataset_name]
        stats = DATASET_STATS[self.dataset_name]
        self.mean = tuple(float(v) for v in (mean if mean is not None else stats[0]))
        self.std = tuple(float(v) for v in (std if std is not None else stats[1]))
        self.num_classes: int = getattr(self, "num_classes", 0)
        self.num_train_samples: int = 0
        self.batch_augmentation = bool(batch_augmentation)
        self._pretrain_dataset: Dataset | None = None
        self._eval_datasets: dict[tuple[str, bool], Dataset] = {}
        self.labelled_subset: np.ndarray | None = None
        self._labelled_train: Dataset | None = None
        #: where the batches go when loaders are built before a Trainer attaches itself (the evaluations build
        #: theirs first): decides ``pin_memory=None`` as the Trainer's device would
        self.batches_device: torch.device | None = None
        self._batch_augment: BatchTwoViewAugmentation | None = None
        self._augment_generator: torch.Generator | None = None

    @property
    def num_workers(self) -> int:
        """Loader workers per process: ``num_workers``, with ``"auto"`` resolved for the trainer's processes."""
        if self.num_workers_setting == "auto":
            trainer = getattr(self, "trainer", None)
            return auto_workers(int(getattr(trainer, "num_devices", 1) or 1) if trainer is not None else 1)
        return int(self.num_workers_setting)

    @num_workers.setter
    def num_workers(self, value: int | str) -> None:
        self.num_workers_setting = value

    @property
    def pin_memory(self) -> bool:
        """Pin the loaders' host memory: the setting, or (``None``) whether the batches go to a CUDA device.

        Never asks CUDA whether it is available: that would initialise it before the forking strategies
        (``ddp_fork``, ``ddp_notebook``) start, which they refuse.
        """
        if self.pin_memory_setting is not None:
            return self.pin_memory_setting
        device = getattr(getattr(getattr(self, "trainer", None), "strategy", None), "root_device", None)
        device = device if isinstance(device, torch.device) else self.batches_device
        if isinstance(device, torch.device):
            return device.type == "cuda"
        return torch.cuda.is_initialized()

    @pin_memory.setter
    def pin_memory(self, value: bool | None) -> None:
        self.pin_memory_setting = None if value is None else bool(value)

    @property
    def persistent_workers(self) -> bool:
        """Keep the workers between epochs: the setting, or (``None``) whether there are workers."""
        if self.persistent_workers_setting is None:
            return self.num_workers > 0
        return bool(self.persistent_workers_setting)

    @persistent_workers.setter
    def persistent_workers(self, value: bool | None) -> None:
        self.persistent_workers_setting = value

    @property
    def has_labels(self) -> bool:
        """Whether the evaluation sets carry class labels (kNN, linear probe, coloured maps); ``True`` here."""
        return True

    def require_labels(self, what: str) -> None:
        """Raise :class:`DatasetError` naming ``what`` when the data has no labels (an unlabelled image folder)."""
        if not self.has_labels:
            folder = getattr(self, "data_dir", "the data")
            raise DatasetError(f"{what} needs labelled images, but data_dir={folder!r} has no class folders; "
                               "arrange the images as <folder>/<class name>/<image> (two classes or more), or give "
                               "a labelled folder as data_dir=...")

    # ------------------------------------------------------------------ subclass hooks
    def _build_pretrain_dataset(self) -> Dataset:
        """Return the pretraining set as ``(image, label)`` pairs without transform."""
        raise NotImplementedError

    def _build_eval_dataset(self, split: str) -> Dataset:
        """Return the labelled ``"train"`` or ``"val"`` evaluation set as ``(image, label)`` without transform."""
        raise NotImplementedError

    # ------------------------------------------------------------------ transforms
    @property
    def pretrain_transform(self) -> Callable[[Any], Any]:
        """What the pretraining loader does to each image: both views, or only what the batch augmentation leaves."""
        if self.batch_augmentation:
            return self.batch_augment.loader_transform
        if callable(self.augmentation):
            return TwoViewTransform(self.augmentation)
        view_1, view_2 = build_view_transforms(self.augmentation, self.image_size, self.mean, self.std,
                                               **self.augmentation_kwargs)
        return TwoViewTransform(view_1, view_2)

    def _pretrain_item_transform(self) -> Callable[[Any], Any] | None:
        """What the pretraining dataset applies to each item its base yields (``None``: the items as they are)."""
        return self.pretrain_transform

    @property
    def batch_augment(self) -> BatchTwoViewAugmentation:
        """The batched two-view augmentation of the recipe (built on first use)."""
        if self._batch_augment is None:
            if callable(self.augmentation):
                raise ValueError(f"{type(self).__name__}: a callable augmentation has no batched counterpart")
            self._batch_augment = build_batch_augmentation(
                self.augmentation, self.image_size, self.mean, self.std, crop_on_device=self.fixed_image_size,
                **self.augmentation_kwargs)
        return self._batch_augment

    def augment_batch(self, batch: Any, index: int | None = None) -> Any:
        """Two augmented views of a pretraining batch on its device: ``(images, y) -> ([x_q, x_k], y)``.

        Batch ``index`` of the run draws from a generator seeded with ``(seed, global_rank, index)`` alone, so a resumed
        run draws what an uninterrupted one draws; without ``index`` one generator seeded with ``seed + 1000 * rank``
        continues.
        """
        if index is None:
            if self._augment_generator is None:
                self._augment_generator = self._generator(seed_offset=3)
            generator = self._augment_generator
        else:
            rank, _ = self._rank_and_world()
            generator = torch.Generator().manual_seed(batch_seed(self.seed, rank, index))
        images, labels = batch[0], batch[1]
        return self.batch_augment(images, generator), labels

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook: augment pretraining batches on the device when ``batch_augmentation`` is on."""
        trainer = self.trainer
        if self.batch_augmentation and trainer is not None and trainer.training:
            # batches fetched before this one over the whole run; restored from the checkpoint on resume
            index = batches_fetched(trainer)
            return self.augment_batch(batch, index)
        return batch

    @property
    def eval_transform(self) -> Callable[[Any], torch.Tensor]:
        """The deterministic evaluation view."""
        return eval_transform(self.dataset_name, self.image_size, self.mean, self.std)

    @property
    def linear_train_transform(self) -> Callable[[Any], torch.Tensor]:
        """The linear-probe training view (random resized crop + flip; no flip for digits)."""
        return linear_train_transform(self.dataset_name, self.image_size, self.mean, self.std)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str | None = None) -> None:
        """Build the pretraining set (once); sets ``num_train_samples`` and ``num_classes``."""
        if self._pretrain_dataset is None:
            base = self._build_pretrain_dataset()
            self._pretrain_dataset = TransformedDataset(base, self._pretrain_item_transform())
            self.num_train_samples = len(self._pretrain_dataset)

    @property
    def pretrain_dataset(self) -> Dataset:
        """The pretraining dataset (``setup()`` must have run); items are ``([view_1, view_2], label)``."""
        if self._pretrain_dataset is None:
            self.setup("fit")
        assert self._pretrain_dataset is not None
        return self._pretrain_dataset

    def labelled_train_dataset(self) -> Dataset:
        """All the labelled training images as ``(image, label)`` without transform (built once; a subset's base)."""
        if self._labelled_train is None:
            self._labelled_train = self._build_eval_dataset("train")
        return self._labelled_train

    def use_labelled_subset(self, indices: Sequence[int] | np.ndarray | None) -> None:
        """Restrict the labelled training images (``eval_train_dataloader``) to ``indices``; ``None``: all of them."""
        self.labelled_subset = None if indices is None else np.asarray(indices, dtype=np.int64)
        self._eval_datasets = {key: ds for key, ds in self._eval_datasets.items() if key[0] != "train"}

    def eval_dataset(self, split: str, augment: bool = False) -> Dataset:
        """The labelled evaluation dataset of ``split`` ("train" or "val"), cached; see :meth:`use_labelled_subset`."""
        if split not in ("train", "val"):
            raise ValueError(f"eval split must be 'train' or 'val', got {split!r}")
        key = (split, augment)
        if key not in self._eval_datasets:
            base = next((ds.base for (s, _), ds in self._eval_datasets.items() if s == split), None)
            if base is None and split == "train":
                base = self.labelled_train_dataset()
                if self.labelled_subset is not None:
                    base = Subset(base, self.labelled_subset.tolist())
            elif base is None:
                base = self._build_eval_dataset(split)
            transform = self.linear_train_transform if augment else self.eval_transform
            # the deterministic view is the same every epoch: kept in memory when it fits (not the augmented one)
            self._eval_datasets[key] = TransformedDataset(base, transform, cache=not augment)
        return self._eval_datasets[key]

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _generator(self, seed_offset: int) -> torch.Generator:
        rank, _ = self._rank_and_world()
        return torch.Generator().manual_seed(self.seed + 1000 * rank + seed_offset)

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool, drop_last: bool,
                seed_offset: int, loader_class: type[DataLoader] = DataLoader, **extra: Any) -> DataLoader:
        generator = self._generator(seed_offset)
        kwargs: dict[str, Any] = dict(extra)
        if self.num_workers > 0:
            kwargs["persistent_workers"] = self.persistent_workers
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return loader_class(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                            num_workers=self.num_workers, pin_memory=self.pin_memory, worker_init_fn=seed_worker,
                            generator=generator, **kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled pretraining batches with ``drop_last=True``: ``([x_q, x_k], y)`` (after :meth:`augment_batch`)."""
        dataset = self.pretrain_dataset
        _, world = self._rank_and_world()
        per_device = len(dataset) // world  # type: ignore[arg-type]
        if per_device < self.batch_size:
            raise DatasetError(
                f"{type(self).__name__}: the pretraining set has {len(dataset)} images "  # type: ignore[arg-type]
                f"({per_device} per device over {world} device(s)), fewer than batch_size={self.batch_size}; "
                "with drop_last=True no batch would be produced. Lower batch_size or use more data.")
        # the order of epoch e is a function of (seed, e), and the loader's position is saved in checkpoints
        rank, _ = self._rank_and_world()
        sampler = StatefulDistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in torch: not ours to fix
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            return self._loader(dataset, self.batch_size, shuffle=False, drop_last=True, seed_offset=0,
                                loader_class=StatefulDataLoader, sampler=sampler)

    def eval_train_dataloader(self, augment: bool = False) -> DataLoader:
        """Labelled training images, one view per image, in a fixed order (kNN memory bank, linear probe).

        Args:
            augment: ``False`` = the deterministic evaluation view; ``True`` = the linear-probe training view
                (random resized crop + flip) and a shuffled order.

        """
        return self._loader(self.eval_dataset("train", augment), self.eval_batch_size, shuffle=augment,
                            drop_last=False, seed_offset=1)

    def eval_val_dataloader(self) -> DataLoader:
        """Labelled validation images, deterministic view, fixed order (kNN queries, linear-probe validation)."""
        return self._loader(self.eval_dataset("val"), self.eval_batch_size, shuffle=False, drop_last=False,
                            seed_offset=2)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_size={self.batch_size}, num_workers={self.num_workers}, "
                f"augmentation={self.augmentation!r}, image_size={self.image_size}, "
                f"batch_augmentation={self.batch_augmentation})")
