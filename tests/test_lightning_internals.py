"""The Lightning internals in use (moco_lightning/lightning_internals.py) are where the installed Lightning has them.

Each test fails with a message that names the workaround to revisit; `nox -s lightning -- <version>` runs them
against another Lightning. The workarounds of open upstream issues have their "still needed" tests next to the
features: tests/checkpointing/test_run_state.py (#20550) and tests/checkpointing/test_atomic_io.py (#21253).
"""

import re
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from moco_lightning.lightning_internals import (
    PRIVATE_ATTRIBUTES,
    PRIVATE_USES,
    TESTED_LIGHTNING,
    KeepingExperimentWriter,
    LightningInternalsError,
    attached_trainer,
    batches_fetched,
    csv_logger_writer,
    internal,
    lightning_sync_batchnorm,
    logger_started,
    require_internals,
    tensorboard_purge_step,
    wandb_resume_run,
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


def _quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def _instance_of(owner: str, tmp_path: Path):
    """An instance (or, for a writer's method, the class) of the Lightning class that owns a private attribute."""
    return {
        "ParallelStrategy": lambda: _quiet_trainer(devices=2, strategy="ddp", sync_batchnorm=True).strategy,
        "LightningModule": L.LightningModule,
        "CSVLogger": lambda: CSVLogger(tmp_path),
        "ExperimentWriter": lambda: ExperimentWriter,
        "TensorBoardLogger": lambda: TensorBoardLogger(tmp_path),
        "WandbLogger": lambda: WandbLogger(save_dir=tmp_path, offline=True),
    }[owner]()


@pytest.mark.parametrize("path", PRIVATE_ATTRIBUTES)
def test_each_private_attribute_in_use_is_where_lightning_has_it(path, tmp_path):
    owner, attribute = path.split(".")
    if owner == "WandbLogger":
        pytest.importorskip("wandb")
    if not hasattr(_instance_of(owner, tmp_path), attribute):
        used_by, upstream = PRIVATE_ATTRIBUTES[path]
        pytest.fail(f"lightning {L.__version__} has no {path}: revisit {used_by} in "
                    f"moco_lightning/lightning_internals.py (upstream: {upstream})")


def test_the_batch_count_and_sync_batchnorm_are_read_from_the_trainer(trainer):
    assert batches_fetched(trainer) == 0
    assert not lightning_sync_batchnorm(trainer)  # one device: no layer sync at all
    assert lightning_sync_batchnorm(_quiet_trainer(devices=2, strategy="ddp", sync_batchnorm=True))
    assert not lightning_sync_batchnorm(_quiet_trainer(devices=2, strategy="ddp"))


def test_a_module_outside_a_trainer_has_no_attached_trainer(trainer):
    module = L.LightningModule()
    assert attached_trainer(module) is None
    module.trainer = trainer
    assert attached_trainer(module) is trainer


def test_the_kept_csv_writer_does_not_delete_the_existing_metrics(tmp_path):
    logger = CSVLogger(tmp_path, name="", version="")
    (Path(logger.log_dir)).mkdir(parents=True, exist_ok=True)
    (Path(logger.log_dir) / "metrics.csv").write_text("step,loss\n0,1.0\n")
    writer = csv_logger_writer(logger, KeepingExperimentWriter)
    assert isinstance(writer, KeepingExperimentWriter) and csv_logger_writer(logger, ExperimentWriter) is writer
    assert (Path(logger.log_dir) / "metrics.csv").read_text() == "step,loss\n0,1.0\n"


def test_tensorboard_gets_the_purge_step_before_it_starts_unless_given_one(tmp_path):
    logger = TensorBoardLogger(tmp_path)
    assert not logger_started(logger)
    tensorboard_purge_step(logger, 7)
    tensorboard_purge_step(logger, 9)
    assert logger._kwargs["purge_step"] == 7


def test_wandb_continues_the_saved_run_unless_given_its_own(tmp_path):
    pytest.importorskip("wandb")
    logger = WandbLogger(save_dir=tmp_path, offline=True)
    assert not logger_started(logger) and wandb_resume_run(logger, "abc42")
    assert logger.version == "abc42" and logger._wandb_init["resume"] == "allow"
    own = WandbLogger(save_dir=tmp_path, offline=True, id="mine")
    assert not wandb_resume_run(own, "abc42") and own.version == "mine"
