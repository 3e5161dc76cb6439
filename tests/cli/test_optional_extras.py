"""A group option whose Hydra plugin is an optional extra that is not installed is one line naming the pip command."""

from __future__ import annotations

import pytest

from moco_lightning.cli import optional_extras
from moco_lightning.cli.config_checks import ConfigError
from moco_lightning.cli.optional_extras import check_optional_extras

from .conftest import run_train

HAS_OPTUNA_SWEEPER = optional_extras._importable("hydra_plugins.hydra_optuna_sweeper")


@pytest.mark.parametrize(("argument", "extra"), [
    ("hparams_search=optuna", "optuna"),
    ("hydra/sweeper=optuna", "optuna"),
    ("hydra/launcher=slurm", "submitit"),
])
def test_an_option_whose_extra_is_missing_names_the_pip_command(argument, extra, monkeypatch):
    monkeypatch.setattr(optional_extras, "_importable", lambda module: False)
    pip = rf'pip install "moco-lightning\[{extra}\]"$'
    with pytest.raises(ConfigError, match=rf"^{argument} needs the optional extra '{extra}', .*{pip}"):
        check_optional_extras(["-m", argument])


def test_an_option_whose_extra_is_installed_passes(monkeypatch):
    monkeypatch.setattr(optional_extras, "_importable", lambda module: True)
    check_optional_extras(["-m", "hparams_search=optuna", "hydra/launcher=slurm"])
    monkeypatch.setattr(optional_extras, "_importable", lambda module: False)
    check_optional_extras(["-m", "hparams_search=dictionary", "model.lr=0.1", "--cfg"])  # none of them needs one


@pytest.mark.skipif(HAS_OPTUNA_SWEEPER, reason="the optuna extra is installed here: Hydra's sweeper is found")
@pytest.mark.timeout(120)
def test_train_py_with_optuna_and_no_extra_is_one_line_and_status_2(tmp_path):
    result = run_train(["-m", "hparams_search=optuna"], cwd=tmp_path, timeout=110)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: hparams_search=optuna needs the optional extra 'optuna', which is not installed: "
        'pip install "moco-lightning[optuna]"']
    assert not (tmp_path / "multirun").exists()
