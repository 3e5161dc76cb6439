"""The Lightning internals in use (moco_lightning/lightning_internals.py) are where the installed Lightning has them.

Each test fails with a message that names the workaround to revisit; `nox -s lightning -- <version>` runs them
against another Lightning. The workarounds of open upstream issues have their "still needed" tests next to the
features: tests/checkpointing/test_run_state.py (#20550) and tests/checkpointing/test_atomic_io.py (#21253).
"""

import re
from pathlib import Path

import lightning as L
import pytest

from moco_lightning.lightning_internals import (
    PRIVATE_USES,
    TESTED_LIGHTNING,
    LightningInternalsError,
    internal,
    require_internals,
)


@pytest.fixture(scope="module")
def trainer() -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("path", PRIVATE_USES)
def test_each_internal_in_use_is_where_lightning_has_it(trainer, path):
    try:
        internal(trainer, path)
    except LightningInternalsError:
        used_by, upstream = PRIVATE_USES[path]
        pytest.fail(f"lightning {L.__version__} moved Trainer.{path}: revisit {used_by} in "
                    f"moco_lightning/lightning_internals.py (upstream: {upstream})")


def test_a_moved_internal_is_a_one_line_error_naming_the_feature_and_the_tested_range():
    class OtherTrainer:  # a Lightning whose fit loop keeps the pending loader states elsewhere
        fit_loop = object()

    with pytest.raises(LightningInternalsError) as info:
        require_internals(OtherTrainer(), "ResumeState")
    message = str(info.value)
    assert "\n" not in message and "fit_loop._combined_loader_states_to_load" in message
    assert "ResumeState" in message and f"lightning{TESTED_LIGHTNING}" in message


def test_the_tested_range_is_the_one_pyproject_requires():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    required = [dep for dep in pyproject["project"]["dependencies"] if re.match(r"lightning\b", dep)]
    assert required == [f"lightning{TESTED_LIGHTNING}"]
