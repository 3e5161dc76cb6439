"""The evaluation CLIs read the data a checkpoint was pretrained on from the checkpoint, unless told otherwise.

A ``moco-train`` checkpoint stores the run's composed config (:class:`~moco_lightning.checkpointing.ResumeState`,
also in ``<run>/.hydra/config.yaml``). ``moco-eval-knn`` and ``moco-eval-linear`` call :func:`adopt_pretraining_data`:

* no ``data=<option>`` on the command line: ``data`` becomes the pretraining run's (dataset, folder, image size,
  normalisation...), and the ``data.<key>=...`` of the command line are applied on top;
* ``data=<option>`` on the command line: that dataset is used, with a warning for each of dataset and image size
  that differs from pretraining;
* no stored config (an official facebookresearch/moco checkpoint): the config's default dataset.

Either way one line says which data the evaluation uses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["adopt_pretraining_data", "command_line_data_keys", "pretraining_config"]

log = logging.getLogger(__name__)

def pretraining_config(checkpoint: str | Path) -> DictConfig | None:
    """The composed config of the run that wrote ``checkpoint``; ``None`` when neither it nor its run folder has one.

    Read from the checkpoint's ``moco_lightning.config`` entry (memory-mapped: the weights are not read), else from
    ``<run>/.hydra/config.yaml`` for a checkpoint in ``<run>/checkpoints/``.
    """
    from moco_lightning.checkpointing.run_state import CHECKPOINT_KEY

    path = Path(str(checkpoint)).expanduser()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        text = (saved.get(CHECKPOINT_KEY) or {}).get("config") if isinstance(saved, dict) else None
    except Exception:  # noqa: BLE001 - an unreadable or foreign file: the loader of the CLI says what is wrong
        text = None
    if text:
        config = OmegaConf.create(text)
        return config if isinstance(config, DictConfig) else None
    run_config = path.resolve().parent.parent / ".hydra" / "config.yaml"
    if run_config.is_file():
        config = OmegaConf.load(run_config)
        return config if isinstance(config, DictConfig) else None
    return None


def command_line_data_keys() -> tuple[bool, list[str]]:
    """``(data=<option> given, [keys of the data.<key>=... given])`` from the Hydra run's command line.

    Outside a Hydra run (a config composed in Python) the config's ``data`` counts as chosen: ``(True, [])``.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return True, []
    group, keys = False, []
    for override in HydraConfig.get().overrides.task:
        key = str(override).split("=", 1)[0].lstrip("+~")
        if key == "data":
            group = True
        elif key.startswith("data."):
            keys.append(key.removeprefix("data."))
    return group, keys


def adopt_pretraining_data(cfg: DictConfig, group_given: bool | None = None,
                           keys_given: list[str] | None = None) -> str:
    """Set ``cfg.data`` to the pretraining data unless the command line chose a dataset; return the line saying which.

    Args:
        cfg: the evaluation config (``checkpoint`` and ``data``); changed in place.
        group_given: whether ``data=<option>`` was on the command line; ``None`` = read Hydra's overrides.
        keys_given: the ``data.<key>`` set on the command line (kept); ``None`` = read Hydra's overrides.

    """
    if group_given is None or keys_given is None:
        group_given, keys_given = command_line_data_keys()
    trained = pretraining_config(cfg.checkpoint)
    data = trained.get("data") if trained is not None else None
    if not isinstance(data, DictConfig) or "_target_" not in data:
        line = (f"data: {_describe(cfg.data)} (the checkpoint stores no pretraining config; choose the data with "
                "data=<option> data.<key>=...)")
    elif group_given:
        _warn_differences(cfg.data, data)
        line = f"data: {_describe(cfg.data)} (from the command line)"
    else:
        new = OmegaConf.create(OmegaConf.to_container(data, resolve=False))
        for key in keys_given:
            if key in cfg.data.keys():
                new[key] = cfg.data[key]
        with open_dict(cfg):
            cfg.data = new
        OmegaConf.set_struct(cfg.data, True)
        given = f"; data.{', data.'.join(keys_given)} from the command line" if keys_given else ""
        line = (f"data: {_describe(cfg.data)} (the checkpoint's pretraining data{given}; evaluate on other data "
                "with data=<option> data.<key>=...)")
    log.info(line)
    return line


def _describe(data: DictConfig) -> str:
    name = str(data.get("_target_", "?")).rsplit(".", 1)[-1]
    parts = [name]
    for key in ("data_dir", "image_size"):
        if key in data.keys() and not OmegaConf.is_missing(data, key):
            parts.append(f"{key}={data[key]}")
    return " ".join(parts)


def _warn_differences(data: DictConfig, trained: Any) -> None:
    for key in ("_target_", "image_size"):
        if key in trained and key in data and trained[key] != data[key]:
            log.warning("data.%s=%r but the checkpoint was pretrained with data.%s=%r; leave out data=... to "
                        "evaluate on the pretraining data", key, data[key], key, trained[key])
