"""The embedding map goes to the image-capable loggers: TensorBoard (read back from its event file) and wandb."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from moco_lightning.eval.embedding_map import log_png
from moco_lightning.plots import embedding_map_figure, save_figure


def _png(tmp_path):
    coords = np.random.default_rng(0).normal(size=(12, 2))
    return save_figure(embedding_map_figure(coords, np.arange(12) % 3, "test"), tmp_path / "map.png")


def test_png_is_logged_as_an_image_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb", version="")
    log_png(SimpleNamespace(loggers=[logger, CSVLogger(tmp_path)], global_step=7), "val/embedding_map",
            _png(tmp_path))
    logger.experiment.flush()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    [image] = events.Images("val/embedding_map")
    assert image.step == 7 and image.width > 100 and image.height > 100


def test_png_is_logged_as_an_image_to_wandb(tmp_path):
    calls = []
    logger = WandbLogger.__new__(WandbLogger)  # no wandb run: only the call is checked
    logger.log_image = lambda **kwargs: calls.append(kwargs)
    path = _png(tmp_path)
    log_png(SimpleNamespace(loggers=[logger], global_step=3), "val/embedding_map", path)
    assert calls == [{"key": "val/embedding_map", "images": [str(path)], "step": 3}]
