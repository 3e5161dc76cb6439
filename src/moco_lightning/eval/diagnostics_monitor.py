"""A callback that logs the state of MoCo's dictionary while it trains, and alignment / uniformity at the kNN runs.

The math is in :mod:`moco_lightning.diagnostics`; this callback decides when to run it and what to log, needs no
labels and never stops a run (a measure that cannot be taken is skipped with one warning line). At Lightning's
logging steps: ``dictionary/key_drift``, ``key_age_max`` / ``key_age_mean``, ``sim_gap`` and ``hardest_neg_sim``,
kept on the device until Lightning writes its logs. At the epochs the kNN monitor runs: ``val/alignment`` (two
augmented views of the validation images, fixed seed) and ``val/uniformity`` (their deterministic view), on the
L2-normalised query embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset

from moco_lightning.diagnostics import alignment, key_ages, parameter_drift, similarity_stats, uniformity
from moco_lightning.eval.cadence import is_monitor_epoch
from moco_lightning.eval.features import monitor_pass
from moco_lightning.eval.knn import monitor_every_n_epochs

__all__ = ["DiagnosticsMonitor", "projector"]


def projector(pl_module: L.LightningModule) -> Callable[[torch.Tensor], torch.Tensor]:
    """The L2-normalised output of the query encoder: ``pl_module.project`` if it has one, else ``encoder_q``."""
    project = getattr(pl_module, "project", None)
    if callable(project):
        return project
    encoder_q = getattr(pl_module, "encoder_q", None)
    if encoder_q is None:
        raise RuntimeError(
            f"{type(pl_module).__name__} has neither project(x) nor encoder_q: the diagnostics cannot embed "
            "images; pass enabled=False"
        )
    return lambda x: F.normalize(encoder_q(x), dim=1)


class _Transformed(Dataset):
    """``(transform(image), label)`` of a dataset of ``(image, label)``."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Any]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.base[index]
        return self.transform(image), label


class DiagnosticsMonitor(Callback):
    """Log dictionary diagnostics at the logging steps and alignment / uniformity when the kNN monitor runs.

    Args:
        enabled: ``False`` turns every diagnostic off (``callbacks.diagnostics.enabled=false``).
        every_n_epochs: epochs between alignment / uniformity runs; ``None`` = the kNN monitor's
            ``every_n_epochs`` (only after the last epoch when there is no kNN monitor). Always after the last.
        max_samples: validation images used at most (the first ones): uniformity costs ``N²/2`` distances.
        seed: seed of the augmentations of the two views for alignment (the same views at every run, so the
            numbers of different epochs compare the encoder, not the draw).

    """

    #: Largest size of the alignment views kept between runs (see :meth:`_views`).
    VIEW_CACHE_BYTES = 256 * 2**20

    def __init__(self, enabled: bool = True, every_n_epochs: int | None = None, max_samples: int = 4096,
                 seed: int = 0) -> None:
        if every_n_epochs is not None and every_n_epochs < 1:
            raise ValueError(f"every_n_epochs={every_n_epochs} must be >= 1 or None (the kNN monitor's); "
                             "set every_n_epochs")
        if max_samples < 2:
            raise ValueError(f"max_samples={max_samples} must be >= 2; set max_samples")
        self.enabled = enabled
        self.every_n_epochs = every_n_epochs
        self.max_samples = max_samples
        self.seed = seed
        self._last_step = -1
        self._warned: set[str] = set()
        self._view_cache: tuple[Any, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    # ---------------------------------------------------------------- at the logging steps
    def step_metrics(self, pl_module: L.LightningModule, outputs: Any, step: int) -> dict[str, torch.Tensor]:
        """The dictionary diagnostics of the module after optimizer step ``step`` (tensors on its device)."""
        metrics: dict[str, torch.Tensor] = {}
        for online, target in (("encoder_q", "encoder_k"), ("base_encoder", "momentum_encoder")):  # v1/v2, v3
            encoder_q, encoder_k = getattr(pl_module, online, None), getattr(pl_module, target, None)
            if encoder_q is not None and encoder_k is not None:
                metrics["dictionary/key_drift"] = parameter_drift(encoder_q, encoder_k)
        written_at = getattr(getattr(pl_module, "key_queue", None), "written_at", None)
        if written_at is not None:
            oldest, mean = key_ages(written_at, step)
            metrics["dictionary/key_age_max"], metrics["dictionary/key_age_mean"] = oldest, mean
        logits = outputs.get("logits") if isinstance(outputs, Mapping) else None
        temperature = getattr(pl_module, "T", None)
        if logits is not None and temperature is not None:
            stats = similarity_stats(logits, float(temperature))
            metrics["dictionary/sim_gap"] = stats["sim_gap"]
            metrics["dictionary/hardest_neg_sim"] = stats["hardest_neg_sim"]
        return metrics

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the dictionary diagnostics once per logging step (after the optimizer step and the EMA update)."""
        step = trainer.global_step
        every = trainer.log_every_n_steps
        # global_step moves once per optimizer step: a repeated value is a micro-batch of gradient accumulation
        if not self.enabled or every < 1 or step == 0 or step == self._last_step or step % every != 0:
            return
        self._last_step = step
        metrics = self.step_metrics(pl_module, outputs, step)
        if metrics:
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    # ---------------------------------------------------------------- at the kNN monitor's epochs
    def representation_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Alignment and uniformity of the normalised query-encoder output on the validation images."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "eval_val_dataloader"):
            self._warn_once("loader", "DiagnosticsMonitor: no datamodule with eval_val_dataloader(): "
                                      "val/alignment and val/uniformity are not computed")
            return {}
        project = projector(pl_module)
        metrics: dict[str, float] = {}
        with monitor_pass(trainer, pl_module), torch.no_grad():
            torch.manual_seed(self.seed)
            z = self._embed(project, (batch[0] for batch in dm.eval_val_dataloader()), pl_module.device)
            metrics["val/uniformity"] = float(uniformity(z))
            views = self._views(dm, pl_module.device)
            if views is not None:
                z1, z2 = [], []
                for x1, x2 in views:
                    z1.append(project(x1.to(pl_module.device)).float())
                    z2.append(project(x2.to(pl_module.device)).float())
                metrics["val/alignment"] = float(alignment(torch.cat(z1), torch.cat(z2)))
        return metrics

    def _views(self, dm: Any, device: torch.device) -> Iterable[tuple[torch.Tensor, torch.Tensor]] | None:
        """The two augmented views of the validation images, batch by batch: the same at every run (fixed seed).

        Being the same, they are kept after the first run when they fit in :attr:`VIEW_CACHE_BYTES` (on the
        digits, augmenting the 720 views costs more than embedding them); larger sets are augmented again each run.
        """
        if self._view_cache is not None and self._view_cache[0] is dm:
            return self._view_cache[1]
        loader = self._two_view_loader(dm)
        if loader is None:
            return None
        if getattr(dm, "batch_augmentation", False):  # the loader gives images; the views are made on the device
            generator = torch.Generator().manual_seed(self.seed)
            return self._caching(dm, (dm.batch_augment(move_data_to_device(images, device), generator)
                                      for images, _ in loader))
        return self._caching(dm, ((x1, x2) for (x1, x2), _ in loader))

    def _caching(self, dm: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]
                 ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        kept: list[tuple[torch.Tensor, torch.Tensor]] | None = []
        size = 0
        for x1, x2 in batches:
            if kept is not None:
                size += x1.numel() * x1.element_size() + x2.numel() * x2.element_size()
                if size <= self.VIEW_CACHE_BYTES:
                    kept.append((x1, x2))
                else:
                    kept = None
            yield x1, x2
        if kept is not None:
            self._view_cache = (dm, kept)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Log ``val/alignment`` and ``val/uniformity`` at the epochs of the kNN monitor."""
        if not self.enabled or not is_monitor_epoch(trainer, monitor_every_n_epochs(trainer, self.every_n_epochs)):
            return
        try:
            metrics = self.representation_metrics(trainer, pl_module)
        except Exception as err:  # noqa: BLE001 - a diagnostic never stops a training run
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            self._warn_once(f"representation:{reason}", f"DiagnosticsMonitor: val/alignment and val/uniformity "
                                                        f"skipped at epoch {trainer.current_epoch} ({reason}); "
                                                        "training goes on")
            return
        for name, value in metrics.items():
            # identical on every process (same images, same seed); sync_dist only silences Lightning's DDP warning
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    # ---------------------------------------------------------------- helpers
    def _embed(self, project: Callable[[torch.Tensor], torch.Tensor], images: Iterable[torch.Tensor],
               device: torch.device) -> torch.Tensor:
        chunks, count = [], 0
        for x in images:
            x = x[: self.max_samples - count]
            chunks.append(project(x.to(device)).float())
            count += x.shape[0]
            if count >= self.max_samples:
                break
        if count < 2:
            raise ValueError("the validation loader yielded fewer than 2 images; uniformity needs at least 2")
        return torch.cat(chunks)

    def _two_view_loader(self, dm: Any) -> DataLoader | None:
        """The first ``max_samples`` validation images under the pretraining augmentation (two views each)."""
        if not (hasattr(dm, "eval_dataset") and hasattr(dm, "pretrain_transform")):
            self._warn_once("views", "DiagnosticsMonitor: the datamodule has no eval_dataset() / pretrain_transform "
                                     "(use a moco_lightning.data datamodule): val/alignment is not computed")
            return None
        base = dm.eval_dataset("val").base
        subset = Subset(base, range(min(len(base), self.max_samples)))
        views = _Transformed(subset, dm.pretrain_transform)
        # in this process: its augmentations draw from the RNG seeded in representation_metrics
        return DataLoader(views, batch_size=getattr(dm, "eval_batch_size", 256), shuffle=False, num_workers=0)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)
