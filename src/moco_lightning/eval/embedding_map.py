"""A callback that draws the validation embeddings as a 2-D map coloured by class, during and after training.

The picture to look at when a kNN number moves: separate clusters, or one cloud? A PNG at the end of training
(``final.png``) and every ``every_n_runs``-th kNN-monitor run, also sent to TensorBoard / wandb. t-SNE
(scikit-learn), or UMAP when installed. An extra: when it cannot be drawn the callback says why in one line and
training goes on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from moco_lightning.eval.cadence import is_monitor_epoch
from moco_lightning.eval.diagnostics_monitor import projector
from moco_lightning.eval.features import has_labels, monitor_pass
from moco_lightning.eval.knn import monitor_every_n_epochs
from moco_lightning.plots import PROJECTIONS, embedding_map_figure, project_2d, save_figure

__all__ = ["FEATURES", "EmbeddingMap"]

#: What is drawn: the query backbone's features (what kNN and linear probes see) or the normalised embedding.
FEATURES = ("backbone", "embedding")


class EmbeddingMap(Callback):
    """Save a 2-D map of the validation embeddings coloured by label, at the end and every N kNN-monitor runs.

    Args:
        dirpath: folder of the PNGs; ``None`` = ``<trainer.default_root_dir>/embedding_maps``.
        every_n_runs: also draw after every n-th run of the kNN monitor (``epoch<NNN>.png``); 0 = only at the end.
        every_n_epochs: the monitor's cadence; ``None`` = the kNN monitor's ``every_n_epochs`` (see
            :func:`moco_lightning.eval.knn.monitor_every_n_epochs`).
        method: ``"auto"`` (UMAP if installed, else t-SNE), ``"tsne"``, ``"umap"`` or ``"pca"``.
        features: ``"backbone"`` (``pl_module.embed``) or ``"embedding"`` (normalised query-encoder output).
        max_points: validation images drawn at most (the first ones).
        seed: seed of the projection.
        log_image: send the PNG to the TensorBoard / wandb loggers of the trainer.

    Attributes:
        last_path: the PNG written last (``None`` before the first).
        skipped: why the last map was not drawn (``None`` when it was).

    """

    def __init__(self, dirpath: str | None = None, every_n_runs: int = 10, every_n_epochs: int | None = None,
                 method: str = "auto", features: str = "backbone", max_points: int = 2000, seed: int = 0,
                 log_image: bool = True) -> None:
        if every_n_runs < 0:
            raise ValueError(f"every_n_runs={every_n_runs} must be >= 0 (0 = only at the end); set every_n_runs")
        if method not in PROJECTIONS:
            raise ValueError(f"method={method!r} is not a projection; set method= one of "
                             f"{', '.join(PROJECTIONS)}")
        if features not in FEATURES:
            raise ValueError(f"features={features!r} is not known; set features= one of "
                             f"{', '.join(FEATURES)}")
        if max_points < 3:
            raise ValueError(f"max_points={max_points} must be >= 3; set max_points")
        self.dirpath = dirpath
        self.every_n_runs = every_n_runs
        self.every_n_epochs = every_n_epochs
        self.method = method
        self.features = features
        self.max_points = max_points
        self.seed = seed
        self.log_image = log_image
        self.last_path: Path | None = None
        self.skipped: str | None = None
        self._runs = 0
        self._told_unlabelled = False

    def folder(self, trainer: L.Trainer) -> Path:
        """Where the PNGs go."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "embedding_maps"

    @torch.no_grad()
    def embeddings(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[np.ndarray, np.ndarray]:
        """Features ``(N, D)`` and labels ``(N,)`` of the first ``max_points`` validation images, in eval mode."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "eval_val_dataloader"):
            raise RuntimeError("EmbeddingMap needs a datamodule with eval_val_dataloader(); remove the "
                               "EmbeddingMap callback or use a moco_lightning.data datamodule")
        embed = pl_module.embed if self.features == "backbone" else projector(pl_module)
        feats, labels, count = [], [], 0
        with monitor_pass(trainer, pl_module):
            for x, y in dm.eval_val_dataloader():
                x, y = x[: self.max_points - count], torch.as_tensor(y)[: self.max_points - count]
                feats.append(embed(x.to(pl_module.device)).float().cpu())
                labels.append(y.cpu())
                count += len(y)
                if count >= self.max_points:
                    break
        return torch.cat(feats).numpy(), torch.cat(labels).numpy()

    def draw(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, epochs: int) -> Path:
        """Embed, project and save ``<folder>/<name>.png`` (after ``epochs`` epochs); log it to image loggers."""
        dm = trainer.datamodule
        labelled = has_labels(dm)
        if not labelled and not self._told_unlabelled:
            self._told_unlabelled = True
            rank_zero_info("embedding map: the images have no labels (no class folders): drawn in one colour")
        features, labels = self.embeddings(trainer, pl_module)
        if len(features) < 3:
            raise ValueError(f"{len(features)} validation image(s); a map needs at least 3")
        if not labelled:
            labels = np.full(len(labels), -1)
        coords, method = project_2d(features, self.method, self.seed)
        title = (f"{method} of {len(labels)} validation images\n{self.features} features after {epochs} "
                 f"epoch{'s' if epochs != 1 else ''} ({trainer.global_step} steps)")
        classes = list(getattr(dm, "classes", None) or []) or None
        if classes is not None and len(labels) and int(labels.max()) >= len(classes):
            classes = None
        figure = embedding_map_figure(coords, labels, title, class_names=classes)
        path = save_figure(figure, self.folder(trainer) / f"{name}.png")
        self.last_path = path
        if self.log_image:
            log_png(trainer, "val/embedding_map", path)
        return path

    def try_draw(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str, epochs: int) -> Path | None:
        """:meth:`draw`, or one warning line saying why the map was skipped (training goes on); ``None`` then."""
        try:
            path = self.draw(trainer, pl_module, name, epochs)
        except Exception as err:  # noqa: BLE001 - an optional picture never stops a training run
            self.skipped = f"{type(err).__name__}: {err}".splitlines()[0]
            rank_zero_warn(f"embedding map {name}.png skipped ({self.skipped}); training goes on")
            return None
        self.skipped = None
        return path

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Count the kNN monitor's runs; draw at every ``every_n_runs``-th one (the last epoch's is ``final.png``)."""
        if not is_monitor_epoch(trainer, monitor_every_n_epochs(trainer, self.every_n_epochs)):
            return
        self._runs += 1
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        if self.every_n_runs and self._runs % self.every_n_runs == 0 and not last and trainer.is_global_zero:
            self.try_draw(trainer, pl_module, f"epoch{trainer.current_epoch + 1:03d}", trainer.current_epoch + 1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Draw the map of the trained encoder (``final.png``), on the main process only."""
        if trainer.is_global_zero:
            self.try_draw(trainer, pl_module, "final", trainer.current_epoch)  # the loop has counted the last epoch

    def state_dict(self) -> dict[str, Any]:
        """The number of kNN-monitor runs seen, so that a resumed run keeps the cadence."""
        return {"runs": self._runs}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the run counter."""
        self._runs = int(state_dict.get("runs", 0))


def log_png(trainer: L.Trainer, tag: str, path: Path) -> None:
    """Send a PNG to every TensorBoard and Weights & Biases logger of the trainer (others have no images)."""
    image = None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=tag, images=[str(path)], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            if image is None:
                from matplotlib.image import imread

                image = imread(path)[..., :3]  # RGBA floats in [0, 1] -> RGB
            logger.experiment.add_image(tag, image, trainer.global_step, dataformats="HWC")
