"""The library's errors in the config's words: an argument the message names becomes ``<config path>.<argument>``.

The library raises errors in its own argument names (``queue_size=...``), as a Python user calls it. The CLI knows
which config node built the object (Hydra's ``full_key``: ``model``, ``data``, ``callbacks.knn``) and its target's
arguments; :func:`name_settings` puts the node's path in front of each, so the error names the setting to change.
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["ConfigError", "arguments_of", "error_line", "in_keys", "instantiation_message", "name_settings",
           "node_settings", "refused_arguments", "signature_of"]

#: Python's spelling of a value in a library message, and the config's (YAML) one.
_YAML_VALUES = {"True": "true", "False": "false", "None": "null"}


class ConfigError(ValueError):
    """A wrong or missing setting; the message is one line naming the key and the fix."""


def in_keys(message: str, keys: Mapping[str, str]) -> str:
    """``message`` with each argument name of ``keys`` (as a word, not under a path) replaced by its config key."""
    if not keys:
        return message
    pattern = r"(?<![\w.])(" + "|".join(map(re.escape, sorted(keys, key=len, reverse=True))) + r")\b"
    return re.sub(pattern, lambda m: keys[m.group(1)], message)


def signature_of(target: Any) -> tuple[dict[str, Any], bool]:
    """The keyword arguments ``target(...)`` takes with their type hints, and whether it takes no others.

    ``**kwargs`` of this package's classes are followed up the class hierarchy (``DigitsDataModule(**kwargs)``
    passes them to ``MoCoDataModule``); those of a third-party class, or a signature that cannot be read, leave the
    list open (``False``).
    """
    arguments: dict[str, Any] = {}
    for cls in target.__mro__ if inspect.isclass(target) else (target,):
        if inspect.isclass(cls) and "__init__" not in vars(cls):
            continue
        init = cls.__init__ if inspect.isclass(cls) else cls
        try:
            parameters = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            return arguments, False
        try:
            hints = typing.get_type_hints(init)
        except Exception:  # noqa: BLE001 - annotations that do not resolve: no types for this class
            hints = {}
        for p in parameters:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self":
                arguments.setdefault(p.name, hints.get(p.name, Any))
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return arguments, True
        if not getattr(cls, "__module__", "").startswith("moco_lightning"):
            return arguments, False
    return arguments, False


def arguments_of(target: Any) -> list[str]:
    """The keyword arguments ``target(...)`` takes (:func:`signature_of`); empty if unknown."""
    return list(signature_of(target)[0])


def name_settings(message: str, key: str, arguments: Iterable[str]) -> str:
    """``message`` with each argument of ``arguments`` it names written as ``key.argument``.

    An argument counts as named where it is followed by ``=`` (``lr=0.5``) or, for a name with an underscore
    (``data_dir``, ``every_n_epochs``), wherever it stands as a word; a name already under a path is left alone.
    A value written the Python way after a named argument (``download=True``) is written the config's way
    (``data.download=true``).
    """
    for name in sorted(set(arguments), key=len, reverse=True):
        ending = r"(?![\w.])" if "_" in name else r"(?==)"
        message = re.sub(rf"(?<![\w.]){re.escape(name)}{ending}", f"{key}.{name}", message)
        message = re.sub(rf"(?<![\w.])({re.escape(f'{key}.{name}')})=(True|False|None)\b",
                         lambda m: f"{m.group(1)}={_YAML_VALUES[m.group(2)]}", message)
    return message


def node_settings(message: str, node: Any, key: str) -> str:
    """:func:`name_settings` for the config node at ``key`` (a mapping with ``_target_``); as is without one."""
    from hydra.utils import get_object

    try:
        target = get_object(str(node["_target_"]))
    except Exception:  # noqa: BLE001 - no target, or one that does not import: the message stays as it is
        return message
    return name_settings(message, key, arguments_of(target))


def instantiation_message(err: BaseException, cfg: Any) -> str:
    """The first line of the constructor's error (``err.__cause__``) with its arguments under Hydra's ``full_key``."""
    from omegaconf import OmegaConf

    cause = err.__cause__ if err.__cause__ is not None else err
    message = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    found = re.search(r"^full_key: (\S+)$", str(err), re.MULTILINE)
    if found is None:
        return message
    key = found.group(1)
    node = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
    return node_settings(message, node, key) if node is not None else message


def refused_arguments(err: BaseException) -> bool:
    """Whether ``err`` wraps a constructor's refusal of its arguments or files (the user's to fix, not a fault)."""
    from hydra.errors import InstantiationException

    from moco_lightning.data import DatasetNotAvailableError

    return isinstance(err, InstantiationException) and isinstance(
        err.__cause__, (ValueError, TypeError, OSError, DatasetNotAvailableError))


def error_line(err: BaseException, cfg: Any) -> str:
    """The one line an entry point prints for a user's error, in config keys where it names arguments."""
    from hydra.errors import InstantiationException

    from moco_lightning.data import DatasetError, DatasetNotAvailableError

    if isinstance(err, InstantiationException):
        return instantiation_message(err, cfg)
    if isinstance(err, (DatasetError, DatasetNotAvailableError)) and cfg.get("data") is not None:
        return node_settings(str(err), cfg.data, "data")
    return str(err)
