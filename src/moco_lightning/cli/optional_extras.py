"""Group options that need an optional extra: one line naming the ``pip install`` when the extra is missing.

Without this, ``python train.py -m hparams_search=optuna`` in an environment without Hydra's Optuna sweeper ends
with Hydra's own "Could not find 'hydra/sweeper/optuna'" and a list of the sweepers it knows.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

from moco_lightning.cli.config_checks import ConfigError

__all__ = ["OPTIONAL_EXTRAS", "check_optional_extras", "exit_on_missing_extra"]

#: ``(group, option) -> (the Hydra plugin the option needs, the extra of pyproject.toml that installs it)``.
OPTIONAL_EXTRAS = {
    ("hparams_search", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "optuna"),
    ("hydra/launcher", "slurm"): ("hydra_plugins.hydra_submitit_launcher", "submitit"),
}


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def check_optional_extras(arguments: Sequence[str]) -> None:
    """Raise :class:`ConfigError` for an option of :data:`OPTIONAL_EXTRAS` whose plugin is not installed.

    ``arguments`` are the command line's: ``group=option`` or a sweep ``group=a,b``; the others are ignored.
    """
    for argument in arguments:
        group, sep, value = argument.lstrip("+").partition("=")
        if not sep or argument.startswith("-"):
            continue
        for option in value.split(","):
            plugin, extra = OPTIONAL_EXTRAS.get((group, option.strip()), (None, None))
            if plugin is not None and not _importable(plugin):
                raise ConfigError(f"{group}={option.strip()} needs the optional extra {extra!r}, which is not "
                                  f'installed: pip install "moco-lightning[{extra}]"')


def exit_on_missing_extra(arguments: Sequence[str]) -> None:
    """:func:`check_optional_extras`: print its error as ``error: ...`` and exit with status 2."""
    try:
        check_optional_extras(arguments)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
