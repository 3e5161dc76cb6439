"""The evaluation CLIs read the data a checkpoint was pretrained on from the checkpoint, unless told otherwise.

:func:`adopt_pretraining_data` reads the composed config a ``moco-train`` checkpoint stores. No ``data=<option>``
on the command line (or the pretraining dataset's own): the pretraining run's data, with the command line's
``data.<key>=...`` on top. Another dataset (``data=cifar10``): that one, at the pretraining image size unless
``data.image_size`` is given. No stored config (an official MoCo checkpoint): the default dataset. Either way one
line says which data the evaluation uses.
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


def command_line_data_keys() -> tuple[bool, list[str]] | None:
    """``(data=<option> given, [keys of the data.<key>=... given])`` from the Hydra run's command line.

    ``None`` outside a Hydra run (a config composed in Python): its ``data`` is taken as it is.
    """
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
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
    """Set ``cfg.data`` from the pretraining data and the command line; return the line saying which data it is.

    * no ``data=<option>``, or the pretraining dataset's own option: the pretraining ``data`` with the command
      line's ``data.<key>`` on top;
    * another dataset: the command line's, at the pretraining image size unless ``data.image_size`` is given;
    * a config composed in Python (no Hydra run, no arguments here) or a checkpoint without a stored config: the
      config's ``data`` as it is (warning about a dataset or image size unlike pretraining).

    Args:
        cfg: the evaluation config (``checkpoint`` and ``data``); changed in place.
        group_given: whether ``data=<option>`` was on the command line; ``None`` (with ``keys_given``) = read
            Hydra's overrides.
        keys_given: the ``data.<key>`` set on the command line (kept).

    """
    given = (group_given, keys_given or []) if group_given is not None else command_line_data_keys()
    trained = pretraining_config(cfg.checkpoint)
    data = trained.get("data") if trained is not None else None
    if not isinstance(data, DictConfig) or "_target_" not in data:
        line = (f"data: {_describe(cfg.data)} (the checkpoint stores no pretraining config; choose the data with "
                "data=<option> data.<key>=...)")
    elif given is None:
        _warn_differences(cfg.data, data)
        line = f"data: {_describe(cfg.data)} (as configured)"
    elif given[0] and cfg.data.get("_target_") != data._target_:
        keys = given[1]
        note = ""
        if "image_size" not in keys and "image_size" in cfg.data.keys() and data.get("image_size") is not None:
            cfg.data.image_size = data.image_size
            note = ", at the pretraining image size"
        line = f"data: {_describe(cfg.data)} (another dataset, from the command line{note})"
    else:
        keys = given[1]
        new = OmegaConf.create(OmegaConf.to_container(data, resolve=False))
        for key in keys:
            if key in cfg.data.keys():
                new[key] = cfg.data[key]
        with open_dict(cfg):
            cfg.data = new
        OmegaConf.set_struct(cfg.data, True)
        mine = f"; data.{', data.'.join(keys)} from the command line" if keys else ""
        line = (f"data: {_describe(cfg.data)} (the checkpoint's pretraining data{mine}; evaluate on other data "
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
