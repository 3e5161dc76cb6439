"""Check a training config before anything is built: what Hydra cannot say, and Hydra's errors in one line.

``python train.py`` calls :func:`check_command_line` on its arguments (before Hydra composes anything) and
:func:`check_config` on the composed config (before any object is instantiated). Every problem raises a
:class:`ConfigError` whose message is one line that names the setting and what to do; the entry point prints it
as ``error: <message>`` and exits with status 2.

Reworded from Hydra and OmegaConf: an unknown group option or command-line key (with the closest one), and a
key or value type that the ``_target_`` does not take (OmegaConf checks them against its signature). Run as the
constructors run them: their own range checks (``check_args`` of the model and the datamodule, e.g.
``model.temperature > 0``). Checked here, as nothing else can before the run: a ViT only with a model that builds
one; ``trainer.devices``; ``model.queue_size`` a multiple of the global batch (``data.batch_size`` x devices x
nodes; twice that with ``model.symmetric``); ``data.batch_size`` a multiple of ``model.bn_splits`` where split BN
runs; ``trainer.sync_batchnorm`` off; ``trainer.precision`` not one of 16-bit weights (``16-true``,
``bf16-true``); ``model.init_from`` a weights file that fits the backbone (the model's ``check_init_from``, on
names and shapes); the dataset on disk where no download will fetch it; ``ckpt_path`` an existing file
(:func:`moco_lightning.checkpointing.check_checkpoint_path`; its contents are checked next, by the training CLI).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import importlib
import inspect
import os
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Lightning's CUDA queries ask NVML, not the driver: CUDA must not start in the parent of ddp_fork / ddp_notebook
from lightning.fabric.accelerators.cuda import is_cuda_available, num_cuda_devices
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from moco_lightning.backbones import VITS
from moco_lightning.bn import (
    BN_MODES,
    SPLIT_MODES,
    check_no_lightning_sync_batchnorm,
    check_split_batch,
    resolve_bn_mode,
)
from moco_lightning.checkpointing import ResumeError, check_checkpoint_path
from moco_lightning.cli import count_devices
from moco_lightning.ema import check_weight_precision

__all__ = ["ConfigError", "check_accelerator", "check_command_line", "check_config", "count_processes",
           "exit_on_bad_command_line", "global_batch_size", "group_options"]

#: Type hints OmegaConf checks by itself (:func:`_check_keys`), and the sequence hints it checks as lists.
_PRIMITIVES = (bool, int, float, str)
_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.MutableSequence)


class ConfigError(ValueError):
    """A wrong or missing setting; the message is one line naming the key and the fix."""


# ---------------------------------------------------------------------------------------------- command line
def group_options(config_dir: str | os.PathLike[str], group: str) -> list[str]:
    """The option names of a config group: the ``*.yaml`` files of ``config_dir/group``, sorted."""
    folder = Path(config_dir) / group
    return sorted(path.stem for path in folder.glob("*.yaml"))


def check_command_line(arguments: Sequence[str], config_dir: str | os.PathLike[str], config_name: str = "train"
                       ) -> None:
    """Reject what Hydra would refuse in several lines: an unknown group option, or a key not in the config.

    ``backbone=resnet101`` names the options of the group, also inside a sweep (``data=digits,svhn``, refused
    before its first job runs); ``data.img_size=64`` names the closest key of the config composed with the group
    options of the command line (a sweep's first). Arguments are parsed by Hydra's own parser; keys added with
    ``+``, removed with ``~``, Hydra's own (``hydra.*``, ``hydra/...``) and what does not parse or compose are left
    to Hydra.
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
        options = value.list if isinstance(value, ChoiceSweep) else value if isinstance(value, list) else [value]
        known = group_options(config_dir, name)
        for option in options:
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
        close = difflib.get_close_matches(name, [str(k) for k in parent.keys()], n=1)
        settings = ", ".join(str(k) for k in parent.keys())
        hint = f"did you mean {f'{parent_key}.' if parent_key else ''}{close[0]}?" if close else (
            f"its settings are {settings}" if settings else f"{parent_key} is empty until a key is added")
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
    _check_backbone_fits_model(cfg.model)
    for section in ("model", "data", "trainer"):
        _check_keys(cfg[section], section)
    for section in ("callbacks", "logger"):
        for name, node in (cfg.get(section) or {}).items():
            if isinstance(node, DictConfig) and "_target_" in node:
                _check_keys(node, f"{section}.{name}")
    for section in ("model", "data"):
        _run_check(cfg[section], section, "check_args", prefix=f"{section}.")
    _run_check(cfg.model, "model", "check_init_from", prefix="model.")  # the file's names and shapes, not its data
    _check_queue(cfg)
    _check_bn(cfg)
    _check_precision(cfg.trainer)
    _check_data_path(cfg.data)
    _check_ckpt_path(cfg.get("ckpt_path"))


def _check_ckpt_path(ckpt_path: Any) -> None:
    """``ckpt_path`` names a file (read and checked later, with the model, by the training CLI)."""
    if ckpt_path is None or str(ckpt_path) == "auto":
        return
    try:
        check_checkpoint_path(str(ckpt_path))
    except ResumeError as err:
        raise ConfigError(str(err)) from None


def _run_check(node: DictConfig, key: str, check_name: str, errors: tuple[type[Exception], ...] = (ValueError,),
               prefix: str = "") -> None:
    """Call the ``_target_``'s own check ``check_name`` with the config's values of its arguments; reword its error.

    ``check_args`` (the range checks its constructor runs; the message starts with ``<argument>=``, so ``prefix``
    ``model.`` names the setting) or ``check_files`` (the datamodule's files on disk).
    """
    check = getattr(_import_target(node._target_, key), check_name, None)
    if check is None:
        return
    try:
        check(**{name: node[name] for name in inspect.signature(check).parameters if name in node})
    except errors as err:
        raise ConfigError(f"{prefix}{err}") from None


def _import_target(path: str, key: str) -> Any:
    module_name, _, attribute = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{key}._target_={path!r} cannot be imported ({err}); check the class path") from None


def _arguments(target: Any) -> dict[str, Any] | None:
    """The keyword arguments ``target(...)`` accepts and their type hints; ``None`` for arbitrary ``**kwargs``.

    ``**kwargs`` of this project's classes are followed up the class hierarchy (``DigitsDataModule(**kwargs)``
    passes them to ``MoCoDataModule``); ``**kwargs`` of third-party classes end the check. Unresolvable hints are
    ``Any``.
    """
    arguments: dict[str, Any] = {}
    for cls in target.__mro__ if inspect.isclass(target) else (target,):
        if inspect.isclass(cls) and "__init__" not in vars(cls):
            continue
        init = cls.__init__ if inspect.isclass(cls) else cls
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return None
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - annotations that do not resolve: no types to check for this class
            hints = {}
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self":
                arguments.setdefault(p.name, hints.get(p.name, Any))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return arguments
        if not getattr(cls, "__module__", "").startswith("moco_lightning"):
            return None
    return None


def _check_keys(node: DictConfig, key: str) -> None:
    """Every key of ``node`` is an argument of its ``_target_``, with a value of the annotated type.

    OmegaConf checks both: the node is merged into a structured config made from the target's signature (the types
    OmegaConf knows: bool, int, float, str, their optional and list forms; any other hint accepts anything), and its
    error is reworded here.
    """
    target_path = node.get("_target_")
    if target_path is None:
        raise ConfigError(f"{key} has no _target_; name the class to build, e.g. {key}._target_=package.Class")
    arguments = _arguments(_import_target(target_path, key))
    if arguments is None:
        return
    values = {name: value for name, value in OmegaConf.to_container(node, resolve=False).items()
              if not (name.startswith("_") and name.endswith("_"))}  # not Hydra's _target_, _partial_...
    fields = [(name, Any if isinstance(values.get(name), dict) else _omegaconf_type(hint),
               dataclasses.field(default=MISSING)) for name, hint in arguments.items()]
    schema = OmegaConf.structured(dataclasses.make_dataclass(f"{key}_schema", fields))
    try:
        OmegaConf.merge(schema, values)
    except ConfigKeyError as err:
        close = difflib.get_close_matches(str(err.key), sorted(arguments), n=1)
        hint = f"did you mean {key}.{close[0]}?" if close else f"valid keys: {', '.join(sorted(arguments))}"
        raise ConfigError(f"{key}.{err.key} is not a setting of {target_path}; {hint}") from None
    except ValidationError as err:
        name = re.split(r"[.\[]", str(err.full_key))[0]
        hint = arguments[name]
        raise ConfigError(f"{key}.{name}={values[name]!r} must be {_describe_type(hint)} ({target_path} takes "
                          f"{name}: {_type_name(hint)}); fix the value") from None


def _omegaconf_type(hint: Any) -> Any:
    """``hint`` where OmegaConf can check it (bool, int, float, str, optional, lists of them), else ``Any``."""
    args = typing.get_args(hint)
    if hint in _PRIMITIVES:
        return hint
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # OmegaConf 2.3 knows Optional, not Union
        items = {a for a in args if a is not type(None)}
        item = items.pop() if len(items) == 1 else float if items == {int, float} else None
        if item not in _PRIMITIVES:
            return Any
        return typing.Optional[item] if type(None) in args else item  # noqa: UP045 - what OmegaConf 2.3 reads
    items = {a for a in args if a is not Ellipsis}
    if typing.get_origin(hint) in _SEQUENCES and len(items) == 1 and args[0] in _PRIMITIVES:
        return typing.List[args[0]]  # type: ignore[valid-type]  # noqa: UP006 - what OmegaConf 2.3 reads
    return Any


def _describe_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(dict.fromkeys(_describe_type(arg) for arg in args))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if hint in names:
        return names[hint]
    if hint in _SEQUENCES or origin in _SEQUENCES:
        items = [a for a in args if a is not Ellipsis]
        if len(items) == 1 and items[0] in names:
            return f"a list of {_describe_type(items[0]).removeprefix('an ').removeprefix('a ')}s"
        return "a list"
    return _type_name(hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def _check_backbone_fits_model(model: DictConfig) -> None:
    """A ViT backbone needs a model that builds one (MoCo v3); say so before the ViT keys look like typos."""
    backbone = model.get("backbone")
    if not (isinstance(backbone, str) and backbone in VITS) or model.get("_target_") is None:
        return
    arguments = _arguments(_import_target(model._target_, "model"))
    if arguments is not None and "patch_size" not in arguments:
        raise ConfigError(f"backbone={backbone} is a Vision Transformer, which {model._target_} does not build "
                          "(MoCo v1/v2 take ResNets); use model=mocov3 with a ViT, or a ResNet backbone")


def check_accelerator(trainer: DictConfig) -> None:
    """``trainer.accelerator=gpu`` where no GPU is visible: say so before Lightning's MisconfigurationException.

    Not part of :func:`check_config`, which also checks GPU configs composed on a machine without one (a login
    node, the tests); the training CLI calls it for the run it is about to start.
    """
    accelerator = str(trainer.get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not is_cuda_available():
        raise ConfigError(f"trainer.accelerator={trainer.accelerator} but no CUDA GPU is visible here "
                          "(torch.cuda.is_available() is false); use trainer.accelerator=cpu or auto, or run "
                          "where a GPU is (check CUDA_VISIBLE_DEVICES and nvidia-smi)")


def count_processes(trainer: DictConfig) -> int | None:
    """Processes of a run: ``trainer.devices`` (auto / -1 resolved with the accelerator's count) x ``num_nodes``.

    ``None`` when the device count cannot be known before the run (``devices=auto`` on an absent accelerator).
    """
    try:
        devices = count_devices(trainer.get("devices", 1))
    except ValueError:
        raise ConfigError(f"trainer.devices={trainer.get('devices')!r} must be a number of devices (1, 8), a list of "
                          "device ids ([0,1]), -1 or auto") from None
    if devices is not None and devices < 1:
        raise ConfigError(f"trainer.devices={trainer.get('devices')} must ask for at least one device")
    accelerator = str(trainer.get("accelerator", "auto"))
    if devices is None and accelerator in ("gpu", "cuda", "auto"):
        devices = num_cuda_devices() if is_cuda_available() else 1 if accelerator == "auto" else None
    elif devices is None and accelerator == "cpu":
        devices = 1
    return None if devices is None else devices * int(trainer.get("num_nodes", 1) or 1)


def global_batch_size(cfg: DictConfig) -> int | None:
    """Images per training step over all processes: ``data.batch_size x devices x num_nodes``.

    ``None`` when the device count cannot be known before the run (``devices=auto`` on an accelerator that is not
    here); the module checks the queue against the real batch at the start of training then.
    """
    processes = count_processes(cfg.trainer)
    return None if processes is None else int(cfg.data.batch_size) * processes


def _check_queue(cfg: DictConfig) -> None:
    if "queue_size" not in cfg.model:  # MoCo v3 has no queue
        return
    queue_size = int(cfg.model.queue_size)
    batch = global_batch_size(cfg)
    if batch is None:
        return
    symmetric = bool(cfg.model.get("symmetric", False))
    keys = batch * (2 if symmetric else 1)  # the symmetric loss enqueues both views' keys
    if queue_size % keys != 0:
        lower = max(keys, queue_size // keys * keys)
        processes = batch // int(cfg.data.batch_size)
        what = (f"twice the global batch {batch} (model.symmetric=true enqueues both views' keys; "
                if symmetric else f"the global batch {batch} (")
        fix = (f"use model.queue_size={lower} or {lower + keys}, or change data.batch_size"
               if cfg.get("ckpt_path") is None else
               "a resumed run keeps the queue of its checkpoint, so choose data.batch_size and the number of "
               f"processes so that {'twice ' if symmetric else ''}the global batch divides {queue_size}")
        raise ConfigError(
            f"model.queue_size={queue_size} must be a multiple of {what}data.batch_size="
            f"{cfg.data.batch_size} x {processes} processes); {fix}"
        )


def _check_bn(cfg: DictConfig) -> None:
    """Lightning's SyncBN stays off; split BN divides the per-device batch (the BN modes: the model's check_args)."""
    if "bn" not in cfg.model:
        return
    processes = count_processes(cfg.trainer)
    mode = str(cfg.model.bn)
    try:
        check_no_lightning_sync_batchnorm(bool(cfg.trainer.get("sync_batchnorm", False)))
        # not MoCo v3 (no bn_splits); an unknown mode is the model's check_args' to report
        if "bn_splits" in cfg.model and mode in BN_MODES and resolve_bn_mode(mode, processes) in SPLIT_MODES:
            check_split_batch(int(cfg.data.batch_size), int(cfg.model.bn_splits), f"model.bn={mode}"
                              if mode in SPLIT_MODES else "model.bn=auto on one process means split BN")
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_precision(trainer: DictConfig) -> None:
    """``trainer.precision`` keeps float32 weights (the momentum update's own check, worded for the config)."""
    try:
        check_weight_precision(trainer.get("precision"))
    except ValueError as err:
        raise ConfigError(f"trainer.{err}") from None


def _check_data_path(data: DictConfig) -> None:
    """The dataset is on disk where nothing will download it: the datamodule's own ``check_files``."""
    if "data_dir" in data.keys() and OmegaConf.is_missing(data, "data_dir"):  # (`in` is False for a ??? value)
        raise ConfigError("data.data_dir is missing; set data.data_dir=/path/to/images")
    _run_check(data, "data", "check_files", (OSError, ValueError, RuntimeError))
