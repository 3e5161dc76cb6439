"""``python train.py`` / ``moco-train``: MoCo pretraining from the Hydra configs in ``conf/``.

Checks the config (:mod:`moco_lightning.cli.config_checks`), builds the datamodule, the module, the callbacks, the
loggers and the Trainer from their ``_target_`` entries, runs ``fit`` (resuming from ``ckpt_path`` when given)
and, with ``knn_report=true``, ends with a table of kNN top-1 of the trained encoder next to the same encoder at
initialisation and raw pixels, followed by the path of the embedding map (``callbacks.embedding_map``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.config_checks import ConfigError, check_command_line, check_config

__all__ = ["KNNReport", "build", "main", "train"]

log = logging.getLogger(__name__)


class KNNReport:
    """Top-1 kNN accuracy of the trained encoder next to references (raw pixels, the encoder at init)."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.rows: dict[str, float] = {}

    @staticmethod
    def measure(embed: Any, datamodule: Any, module: torch.nn.Module | None = None) -> float:
        """Top-1 kNN accuracy (a fraction) of ``embed`` on the datamodule's eval loaders, ``module`` in eval mode."""
        from moco_lightning.eval.knn import eval_mode, knn_accuracy

        device = next(module.parameters()).device if module is not None else None
        with eval_mode(module):
            result = knn_accuracy(embed, datamodule.eval_train_dataloader(), datamodule.eval_val_dataloader(),
                                  num_classes=getattr(datamodule, "num_classes", None) or None, device=device)
        return result["top1"]

    def table(self) -> str:
        """The rows as aligned text; the trained encoder's row also shows its gain over the encoder at init."""
        lines = [f"kNN top-1 on {self.dataset} (k=200, t=0.1; train images as memory bank, val as queries):"]
        init = self.rows.get("encoder at init")
        for name, value in self.rows.items():
            line = f"  {name:<24}{100 * value:6.1f} %"
            if name == "trained encoder" and init is not None:
                line += f"   ({100 * (value - init):+.1f} over init)"
            lines.append(line)
        return "\n".join(lines)


def _instantiate_all(section: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every ``{name: {_target_: ...}}`` entry of a callbacks / logger section."""
    objects = []
    for name, node in (section or {}).items():
        if isinstance(node, DictConfig) and "_target_" in node:
            objects.append(instantiate(node, _convert_="all"))
        elif node is not None:
            log.warning("%s.%s has no _target_ (its group option was not chosen): skipped", what, name)
    return objects


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Instantiate the datamodule, the module and the Trainer (with callbacks and loggers) of a config."""
    # _convert_="all": plain lists / dicts, so that checkpoints (hparams) hold no OmegaConf objects and load
    # with torch.load(weights_only=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = instantiate(cfg.model, _convert_="all")
    callbacks = _instantiate_all(cfg.get("callbacks"), "callbacks")
    loggers = _instantiate_all(cfg.get("logger"), "logger")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    return datamodule, model, trainer


def train(cfg: DictConfig) -> float | None:
    """Check the config, build everything, fit; returns ``cfg.optimized_metric`` at the end (for sweepers)."""
    try:
        choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else None
        check_config(cfg, choices)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})

    report = None
    if cfg.get("knn_report") and cfg.get("ckpt_path") is None:
        report = KNNReport(type(datamodule).__name__.removesuffix("DataModule"))
        datamodule.prepare_data()
        datamodule.setup("fit")
        report.rows["raw pixels"] = KNNReport.measure(lambda x: x.flatten(1), datamodule)
        report.rows["encoder at init"] = KNNReport.measure(model.embed, datamodule, model)
        log.info("kNN top-1 before training: raw pixels %.4f, encoder at init %.4f",
                 report.rows["raw pixels"], report.rows["encoder at init"])

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    if report is not None:
        report.rows["trained encoder"] = KNNReport.measure(model.embed, datamodule, model)
        if trainer.is_global_zero:
            print(report.table(), flush=True)
    _print_embedding_map(trainer)
    checkpoint = trainer.checkpoint_callback
    if trainer.is_global_zero and checkpoint is not None and checkpoint.dirpath:
        print(f"checkpoints: {checkpoint.dirpath} (resume with ckpt_path={checkpoint.dirpath}/last.ckpt)")

    metric = cfg.get("optimized_metric")
    if metric and metric in trainer.callback_metrics:
        return float(trainer.callback_metrics[metric])
    return None


def _print_embedding_map(trainer: L.Trainer) -> None:
    """Say where the embedding map of the trained encoder is (callbacks.embedding_map), next to the kNN table."""
    from moco_lightning.eval.embedding_map import EmbeddingMap

    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, EmbeddingMap) and callback.last_path is not None and trainer.is_global_zero:
            print(f"embedding map: {callback.last_path}", flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    return train(cfg)


def main() -> None:
    """Console entry point: check the group options named on the command line, then run Hydra."""
    try:
        check_command_line(sys.argv[1:], CONFIG_PATH)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
