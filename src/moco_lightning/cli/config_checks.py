"""Check a training config before anything is built; what Hydra, OmegaConf and the library say, in one line each.

The range checks are the library's own (``check_args``, ``check_init_from``, ``check_files``, the queue, BN,
precision and checkpoint-path checks), run on the config's values, their messages in config keys
(:mod:`moco_lightning.cli.errors`). Checked here, as nothing else does before the run: keys and value types the
``_target_`` does not take, a ViT with a model that does not build one. A problem is a :class:`ConfigError`: one
line, the key and the fix. What the constructors raise when the run builds them, the training CLI translates too.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.fabric.accelerators.cuda import is_cuda_available
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from moco_lightning.backbones import VITS
from moco_lightning.bn import (
    BN_MODES,
    SPLIT_MODES,
    check_no_lightning_sync_batchnorm,
    check_split_batch,
    resolve_bn_mode,
)
from moco_lightning.checkpointing import ResumeError, check_checkpoint_path
from moco_lightning.cli import count_processes
from moco_lightning.cli.errors import ConfigError, in_keys, name_settings, signature_of
from moco_lightning.ema import check_weight_precision
from moco_lightning.queue import check_queue_size

__all__ = ["ConfigError", "check_accelerator", "check_command_line", "check_config", "exit_on_bad_command_line",
           "group_options"]

#: How a value of a type hint is named in a message; hints not listed here are the constructor's to check.
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


# ---------------------------------------------------------------------------------------------- command line
def group_options(config_dir: str | os.PathLike[str], group: str) -> list[str]:
    """The option names of a config group: the ``*.yaml`` files of ``config_dir/group``, sorted."""
    return sorted(path.stem for path in (Path(config_dir) / group).glob("*.yaml"))


def check_command_line(arguments: Sequence[str], config_dir: str | os.PathLike[str], config_name: str = "train"
                       ) -> None:
    """Refuse in one line what Hydra refuses in several: an unknown group option, a key not in the config.

    Group options are checked in sweeps too; keys in the config composed with the command line's group options.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    try:
        overrides = OverridesParser.create().parse_overrides([a for a in arguments if "=" in a and a[0] != "-"])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra reports it
        return
    groups, keys = [], []
    for override in overrides:
        name, value = override.key_or_group, override.value()
        if override.is_delete() or name.split(".")[0].split("/")[0] == "hydra":
            continue
        if not (Path(config_dir) / name).is_dir():
            keys += [] if override.is_add() or "/" in name else [name]
            continue
        known = group_options(config_dir, name)
        for option in value.list if isinstance(value, ChoiceSweep) else value if isinstance(value, list) else [value]:
            if isinstance(option, str) and option not in known:
                noun = "dataset" if name == "data" else name.replace("_", " ")
                raise ConfigError(f"{name}={option}: unknown {noun} {option!r}; choose one of {', '.join(known)} "
                                  f"(the files in conf/{name}/)")
        if not override.is_sweep_override():
            groups.append(override.input_line)
        elif isinstance(value, ChoiceSweep):
            groups.append(f"{name}={value.list[0]}")
    if not keys:
        return
    try:
        with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
            cfg = compose(config_name, overrides=groups)
    except Exception:  # noqa: BLE001 - whatever does not compose, Hydra reports itself
        return
    for key in keys:
        parent_key, _, name = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None, throw_on_missing=False) if parent_key else cfg
        if not isinstance(parent, DictConfig) or name in parent.keys():  # (`in` is False for a ??? value)
            continue
        settings = [str(k) for k in parent.keys()]
        close = difflib.get_close_matches(name, settings, n=1)
        hint = (f"did you mean {f'{parent_key}.' if parent_key else ''}{close[0]}?" if close else
                f"its settings are {', '.join(settings)}" if settings else
                f"{parent_key} is empty until a key is added")
        raise ConfigError(f"{key} is not a setting of this config; {hint} (to add a new key on purpose: +{key}=...)")


def exit_on_bad_command_line(config_dir: str | os.PathLike[str], config_name: str) -> None:
    """:func:`check_command_line` on ``sys.argv``: print its error as ``error: ...`` and exit with status 2."""
    try:
        check_command_line(sys.argv[1:], config_dir, config_name)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------- composed config
def check_config(cfg: DictConfig) -> None:
    """Check a composed training config (of ``conf/train.yaml``); raise :class:`ConfigError` on the first problem."""
    for section in ("model", "data", "trainer"):
        if cfg.get(section) is None:
            raise ConfigError(f"the config has no '{section}' section; choose one with {section}=<option>")
    backbone, (arguments, _) = cfg.model.get("backbone"), signature_of(_target(cfg.model, "model"))
    if isinstance(backbone, str) and backbone in VITS and "patch_size" not in arguments:
        raise ConfigError(f"backbone={backbone} is a Vision Transformer, which {cfg.model._target_} does not build "
                          "(MoCo v1/v2 take ResNets); use model=mocov3 with a ViT, or a ResNet backbone")
    sections = [(cfg[s], s) for s in ("model", "data", "trainer")] + [
        (node, f"{s}.{name}") for s in ("callbacks", "logger") for name, node in (cfg.get(s) or {}).items()
        if isinstance(node, DictConfig) and "_target_" in node]
    for node, key in sections:
        _check_keys(node, key)
    for section, check in (("model", "check_args"), ("data", "check_args"), ("model", "check_init_from")):
        _run_check(cfg[section], section, check)
    processes = count_processes(cfg.trainer)
    try:
        check_no_lightning_sync_batchnorm(bool(cfg.trainer.get("sync_batchnorm", False)))
        check_weight_precision(cfg.trainer.get("precision"))
    except ValueError as err:
        message = str(err).replace("the Trainer's sync_batchnorm=True", "sync_batchnorm=true").replace(
            "sync_batchnorm=False and the module's bn=", "sync_batchnorm=false and bn=")
        raise ConfigError(in_keys(message, {"precision": "trainer.precision", "sync_batchnorm":
                                            "trainer.sync_batchnorm", "bn": "model.bn"})) from None
    if "queue_size" in cfg.model and processes is not None:  # (MoCo v3 has no queue)
        try:
            check_queue_size(int(cfg.model.queue_size), int(cfg.data.batch_size), processes,
                             bool(cfg.model.get("symmetric", False)))
        except ValueError as err:
            message = in_keys(str(err), {"queue_size": "model.queue_size", "batch_size": "data.batch_size",
                                          "symmetric": "model.symmetric"})
            if cfg.get("ckpt_path") is not None:
                message = (message.split("; use ")[0] + "; a resumed run keeps the queue of its checkpoint, so "
                           "choose data.batch_size and the number of processes so that it divides the queue")
            raise ConfigError(message) from None
    mode = str(cfg.model.get("bn"))
    if "bn_splits" in cfg.model and mode in BN_MODES and resolve_bn_mode(mode, processes) in SPLIT_MODES:
        try:  # (an unknown mode is the model's check_args' to report; MoCo v3 has no bn_splits)
            check_split_batch(int(cfg.data.batch_size), int(cfg.model.bn_splits), f"model.bn={mode}"
                              if mode in SPLIT_MODES else "model.bn=auto on one process means split BN")
        except ValueError as err:
            raise ConfigError(in_keys(str(err), {"batch_size": "data.batch_size", "bn_splits": "model.bn_splits"})
                              ) from None
    _run_check(cfg.data, "data", "check_files", (OSError, ValueError, RuntimeError))
    if cfg.get("ckpt_path") is not None and str(cfg.ckpt_path) != "auto":
        try:  # the file's contents are checked with the model, by the training CLI
            check_checkpoint_path(str(cfg.ckpt_path))
        except ResumeError as err:
            raise ConfigError(str(err)) from None


def _target(node: DictConfig, key: str) -> Any:
    if node.get("_target_") is None:
        raise ConfigError(f"{key} has no _target_; name the class to build, e.g. {key}._target_=package.Class")
    module_name, _, attribute = str(node._target_).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}._target_={node._target_!r} cannot be imported ({err}); fix the class path") from None


def _run_check(node: DictConfig, key: str, check_name: str, errors: tuple[type[Exception], ...] = (ValueError,)
               ) -> None:
    """Call the ``_target_``'s own check with the config's values of its arguments; its message in config keys."""
    check = getattr(_target(node, key), check_name, None)
    if check is None:
        return
    names = [name for name in inspect.signature(check).parameters if name in node.keys()]  # (??? values too)
    try:
        check(**{name: node[name] for name in names})
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is not set (??? in the config); set {err.full_key}=...") from None
    except errors as err:
        raise ConfigError(name_settings(str(err), key, names)) from None


def _check_keys(node: DictConfig, key: str) -> None:
    """Every key of ``node`` is an argument of its ``_target_``, with a value of a plain annotated type."""
    arguments, closed = signature_of(_target(node, key))
    if not closed:
        return
    for name, value in OmegaConf.to_container(node, resolve=False).items():  # type: ignore[union-attr]
        if name.startswith("_") and name.endswith("_"):  # Hydra's _target_, _partial_...
            continue
        if name not in arguments:
            close = difflib.get_close_matches(str(name), sorted(arguments), n=1)
            hint = f"did you mean {key}.{close[0]}?" if close else f"valid keys: {', '.join(sorted(arguments))}"
            raise ConfigError(f"{key}.{name} is not a setting of {node._target_}; {hint}")
        hint = arguments[name]
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if (all(option in _TYPE_NAMES for option in options) and not (isinstance(value, str) and "${" in value)
                and not any(_is_a(value, option) for option in options)):
            wanted = " or ".join(dict.fromkeys(_TYPE_NAMES[option] for option in options))
            raise ConfigError(f"{key}.{name}={value!r} must be {wanted} ({node._target_} takes {name}: "
                              f"{' | '.join(getattr(o, '__name__', str(o)) for o in options)}); fix the value")


def _is_a(value: Any, hint: type) -> bool:
    if hint in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if hint is float else hint)


def check_accelerator(trainer: DictConfig) -> None:
    """``trainer.accelerator=gpu`` where no GPU is visible; not in :func:`check_config` (run for the run started)."""
    if str(trainer.get("accelerator", "auto")).lower() in ("gpu", "cuda") and not is_cuda_available():
        raise ConfigError(f"trainer.accelerator={trainer.accelerator} but no CUDA GPU is visible here "
                          "(torch.cuda.is_available() is false); use trainer.accelerator=cpu or auto, or run "
                          "where a GPU is (check CUDA_VISIBLE_DEVICES and nvidia-smi)")
