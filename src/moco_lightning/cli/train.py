"""``python train.py`` / ``moco-train``: MoCo pretraining from the Hydra configs in ``conf/``.

Checks the config (:mod:`moco_lightning.cli.config_checks`), builds every part from its ``_target_``, resumes from
``ckpt_path=<file>`` or ``ckpt_path=auto`` (the run folder's newest valid checkpoint), runs ``fit`` and, with
``knn_report=true``, prints kNN top-1 of the trained encoder next to its initialisation and raw pixels. Unlabelled
images train too (the kNN parts step aside with one info line); a resumed run continues its logs.

A user's error ends as one line ``error: ...`` on stderr (status 2 for bad input, 1 for a fault during the run),
with no run folder left if no step ran; SIGTERM / SIGUSR1 save, say how to resume and exit with ``128 + signal``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, read_write

from moco_lightning.checkpointing import (
    DiskFullError,
    PreemptionCheckpoint,
    ResumeError,
    ResumeState,
    check_checkpoint_matches,
    continue_loggers,
    find_resume_checkpoint,
    read_training_checkpoint,
)
from moco_lightning.cli import CONFIG_PATH, RUN_ERROR_FILE, share_cpus
from moco_lightning.cli.config_checks import (
    ConfigError,
    check_accelerator,
    check_config,
    exit_on_bad_command_line,
)
from moco_lightning.cli.errors import instantiation_message, node_settings, refused_arguments
from moco_lightning.cli.optional_extras import exit_on_missing_extra
from moco_lightning.data import DatasetError, DatasetNotAvailableError
from moco_lightning.eval.features import has_labels
from moco_lightning.nonfinite import NonFiniteLossError

__all__ = ["KNNReport", "build", "main", "resolve_checkpoint", "train"]

log = logging.getLogger(__name__)

#: Errors shown as one line ``error: <message>`` with this exit status instead of a traceback.
CLEAN_ERRORS: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2), (ResumeError, 2), (DatasetError, 2), (DatasetNotAvailableError, 2),  # bad input
    (DiskFullError, 1), (NonFiniteLossError, 1),  # faults during the run
)
#: The config node that built the object whose errors these are: their argument names become its keys.
ERROR_NODES: tuple[tuple[type[BaseException], str], ...] = (
    (DatasetError, "data"), (DatasetNotAvailableError, "data"), (NonFiniteLossError, "model"),
)


class KNNReport:
    """Top-1 kNN accuracy of the trained encoder next to references (raw pixels, the encoder at init)."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset
        self.rows: dict[str, float] = {}

    @staticmethod
    def measure(embed: Any, datamodule: Any, module: torch.nn.Module | None = None,
                device: torch.device | None = None) -> float:
        """Top-1 kNN accuracy (a fraction) of ``embed`` on the datamodule's eval loaders, ``module`` in eval mode.

        ``module`` is moved to ``device`` first (``None``: where it is). Under ``torch.distributed`` every process
        must call it: each embeds its shard of the images (:func:`~moco_lightning.eval.knn.knn_accuracy`).
        """
        from moco_lightning.distributed import broadcast_batchnorm_statistics
        from moco_lightning.eval.features import eval_mode
        from moco_lightning.eval.knn import knn_accuracy

        if module is not None and device is not None:
            module.to(device)
        if module is not None:
            broadcast_batchnorm_statistics(module)  # one model on every process: rank 0's, as in its checkpoint
        device = next(module.parameters()).device if module is not None else device
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
    """Instantiate the datamodule, the module and the Trainer (with callbacks and loggers) of a config.

    A constructor's refusal of its arguments or files becomes a ``ConfigError`` naming ``<config node>.<argument>``.
    """
    # _convert_="all": plain lists / dicts, so that checkpoints (hparams) hold no OmegaConf objects and load
    # with torch.load(weights_only=True)
    try:
        datamodule = instantiate(cfg.data, _convert_="all")
        model = instantiate(cfg.model, _convert_="all")
        callbacks = _instantiate_all(cfg.get("callbacks"), "callbacks")
        loggers = _instantiate_all(cfg.get("logger"), "logger")
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all")
    except InstantiationException as err:
        if not refused_arguments(err):
            raise
        raise ConfigError(instantiation_message(err, cfg)) from err
    return datamodule, model, trainer


def resolve_checkpoint(cfg: DictConfig, model: torch.nn.Module, trainer: L.Trainer) -> str | None:
    """The checkpoint to resume from, read and checked against ``model``; ``None`` to start from scratch.

    ``ckpt_path=auto`` looks in the trainer's checkpoint folders (``ModelCheckpoint`` dirpaths, and
    ``default_root_dir`` for SLURM's ``hpc_ckpt_*.ckpt``) and takes the newest valid file, skipping unreadable ones
    with a warning; none there means a fresh start (the first launch of a job that is requeued with the same
    command). A file path is read and checked the same way (``ResumeError`` when it does not fit).
    """
    value = cfg.get("ckpt_path")
    if value is None:
        return None
    if str(value) == "auto":
        folders = _checkpoint_folders(trainer)
        found = find_resume_checkpoint(folders)
        if found is None:
            log.info("ckpt_path=auto: no checkpoint in %s: starting from scratch", ", ".join(map(str, folders)))
            if not _run_dir_given():
                log.warning("ckpt_path=auto looked in a new run folder (Hydra's dated default); to resume a run, "
                            "give its folder: hydra.run.dir=<run folder> ckpt_path=auto")
            return None
        path, checkpoint = found
    else:
        path, checkpoint = Path(str(value)), read_training_checkpoint(str(value))
    check_checkpoint_matches(checkpoint, model, path)
    continue_loggers(trainer.loggers, checkpoint)  # the run's CSV rows, TensorBoard and wandb runs go on
    # resuming in the run's own folder: its checkpoints are expected there (Lightning warns about them)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    log.info("resuming from %s (epoch %s, step %s)", path, checkpoint.get("epoch"), checkpoint.get("global_step"))
    return str(path)


def _run_dir_given() -> bool:
    """Whether the run folder was chosen on the command line (``hydra.run.dir=...``); ``True`` outside Hydra."""
    if not HydraConfig.initialized():
        return True
    overrides = HydraConfig.get().overrides.hydra
    return any(str(o).lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for o in overrides)


def _checkpoint_folders(trainer: L.Trainer) -> list[Path]:
    folders = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    return list(dict.fromkeys([*folders, Path(trainer.default_root_dir)]))


@contextmanager
def _clean_exit(cfg: DictConfig, trainer: L.Trainer | None = None) -> Iterator[None]:
    """Turn the errors of :data:`CLEAN_ERRORS` into ``error: ...`` and a signal stop into how-to-resume, then exit."""
    try:
        yield
    except SIGTERMException:
        callback = next((cb for cb in (trainer.callbacks if trainer else []) if isinstance(cb, PreemptionCheckpoint)),
                        None)
        signum = (callback.signum if callback is not None else None) or int(signal.SIGTERM)
        saved = callback.saved_path if callback is not None else None
        where = f"saved {saved}" if saved else "no checkpoint was saved (callbacks.preemption is off)"
        step = trainer.global_step if trainer is not None else "?"
        if trainer is None or trainer.is_global_zero:  # every process stopped at this step: one line says so
            print(f"stopped by {signal.Signals(signum).name} at step {step}: {where}; resume with the same command "
                  f"and ckpt_path=auto hydra.run.dir={cfg.paths.output_dir}", file=sys.stderr, flush=True)
        sys.exit(128 + signum)
    except tuple(error for error, _ in CLEAN_ERRORS) as err:
        status = next(code for error, code in CLEAN_ERRORS if isinstance(err, error))
        log.debug("the run ended with an error", exc_info=True)
        if trainer is None or trainer.global_step == 0:
            _remove_unused_run_dir(cfg)
        message = _one_line(err)
        node = next((key for error, key in ERROR_NODES if isinstance(err, error)), None)
        if node is not None and cfg.get(node) is not None:
            message = node_settings(message, cfg[node], node)
        _record_error(cfg, message)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(status)
    except Exception as err:
        _record_error(cfg, f"{type(err).__name__}: {_one_line(err)}")
        raise


def _one_line(err: BaseException) -> str:
    """The message of an error; for one re-raised from a loader worker (with the worker's traceback), its last line."""
    text = str(err).strip()
    if "Traceback (most recent call last)" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].isidentifier() else last
    return text


def _run_dir(cfg: DictConfig) -> Path | None:
    """The run folder (``paths.output_dir``) when it exists, else ``None``."""
    try:
        folder = Path(str(cfg.paths.output_dir))
    except Exception:  # noqa: BLE001 - no run folder outside a Hydra run
        return None
    return folder if folder.is_dir() else None


def _record_error(cfg: DictConfig, message: str) -> None:
    """Leave the error in the run folder's :data:`RUN_ERROR_FILE`, where ``moco-sweep-report`` looks for it."""
    folder = _run_dir(cfg)
    if folder is None:
        return  # removed: the run stopped before it started
    try:
        (folder / RUN_ERROR_FILE).write_text(message + "\n")
    except OSError:  # a full disk: the error itself says so on stderr
        pass


def _remove_unused_run_dir(cfg: DictConfig) -> None:
    """Remove the run folder Hydra made for a run that stopped before it started (only Hydra's files in it)."""
    folder = _run_dir(cfg)
    if folder is None or not HydraConfig.initialized():
        return
    here = Path.cwd().resolve()
    if folder.resolve() == here or folder.resolve() in here.parents:
        return  # hydra.run.dir=. : never the folder the user works in
    entries = list(folder.iterdir())
    if not all(entry.name == ".hydra" or (entry.is_file() and entry.suffix == ".log") for entry in entries):
        return  # a run folder with checkpoints, logs or anything else of a user: keep it
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent  # Hydra's outputs/<date>/<time>: the date folder too when it is now empty
    if parent.name[:2].isdigit() and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


def _config_text(cfg: DictConfig) -> str:
    try:
        return OmegaConf.to_yaml(cfg, resolve=True)
    except Exception:  # noqa: BLE001 - an interpolation that only resolves inside a Hydra run: keep it as written
        return OmegaConf.to_yaml(cfg)


def train(cfg: DictConfig) -> float | None:
    """Check the config, build everything, fit; returns ``cfg.optimized_metric`` at the end (for sweepers)."""
    with _clean_exit(cfg):
        check_config(cfg)
        check_accelerator(cfg.trainer)

    L.seed_everything(cfg.seed)
    with _clean_exit(cfg):
        datamodule, model, trainer = build(cfg)
    share_cpus(datamodule, trainer)
    run_dir = _run_dir(cfg)
    if run_dir is not None:
        (run_dir / RUN_ERROR_FILE).unlink(missing_ok=True)  # the error of an earlier attempt in this folder
    for callback in trainer.callbacks:
        if isinstance(callback, ResumeState) and callback.config is None:
            callback.config = _config_text(cfg)
    with _clean_exit(cfg, trainer):
        labelled = has_labels(datamodule)  # scans an image folder: its errors are one line too
        if not labelled:
            _drop_label_metrics(trainer)
        ckpt_path = resolve_checkpoint(cfg, model, trainer)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": OmegaConf.to_container(cfg, resolve=True)})

        report = None
        if cfg.get("knn_report") and not labelled:
            log.info("knn_report: the images have no labels (no class folders): no kNN table at the end")
        elif cfg.get("knn_report"):
            report = KNNReport(type(datamodule).__name__.removesuffix("DataModule"))
            reused = None if ckpt_path is not None else _monitor_at_init(trainer)
            if trainer.is_global_zero:  # once; the other processes wait for it in fit's rendezvous
                _report_before_training(report, datamodule, model, trainer, resumed=ckpt_path is not None,
                                        init_from_monitor=reused is not None)

        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)

    if report is not None:
        if reused is not None and reused.initial and report.rows:  # the monitor's pass at step 0 is the init row
            report.rows = {"raw pixels": report.rows["raw pixels"], "encoder at init": reused.initial["top1"]}
        _report_after_training(report, datamodule, model, trainer)
    _print_embedding_map(trainer)
    checkpoint = trainer.checkpoint_callback
    if trainer.is_global_zero and checkpoint is not None and checkpoint.dirpath:
        _print_and_log(f"checkpoints: {checkpoint.dirpath} (resume with ckpt_path={checkpoint.dirpath}/last.ckpt, or "
              f"ckpt_path=auto hydra.run.dir={cfg.paths.output_dir})")

    metric = cfg.get("optimized_metric")
    if metric and metric in trainer.callback_metrics:
        return float(trainer.callback_metrics[metric])
    return None


def _drop_label_metrics(trainer: L.Trainer) -> None:
    """Without labels: drop the checkpoint callbacks that keep the best model by a kNN metric (it cannot exist).

    ``last.ckpt`` and the step checkpoints (no monitor) stay.
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    from moco_lightning.eval.knn import KNNMonitor

    prefixes = tuple({cb.prefix for cb in trainer.callbacks if isinstance(cb, KNNMonitor)} | {"val/knn"})
    dropped = [cb for cb in trainer.callbacks
               if isinstance(cb, ModelCheckpoint) and cb.monitor and str(cb.monitor).startswith(prefixes)]
    if dropped:
        trainer.callbacks = [cb for cb in trainer.callbacks if not any(cb is d for d in dropped)]
        log.info("checkpoints: the images have no labels: no best-by-%s checkpoint (last.ckpt is kept)",
                 ", ".join(sorted({str(cb.monitor) for cb in dropped})))


def _monitor_at_init(trainer: L.Trainer) -> Any:
    """The kNN monitor that measures the encoder at init as the report would (at step 0, backbone, k 200, t 0.1).

    On a fresh run its pass is the table's "encoder at init" row, instead of a second pass over the same images.
    """
    from moco_lightning.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, KNNMonitor

    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, KNNMonitor) and callback.at_start and callback.features == "backbone" and (
                callback.knn_kwargs["k"], callback.knn_kwargs["temperature"]) == (DEFAULT_K, DEFAULT_TEMPERATURE):
            return callback
    return None


def _report_before_training(report: KNNReport, datamodule: Any, model: torch.nn.Module, trainer: L.Trainer,
                            resumed: bool, init_from_monitor: bool = False) -> None:
    """The reference rows of the kNN table (raw pixels, the encoder at init), on the main process; one line if not.

    Measured before ``fit`` starts the other processes, on the training device unless a launcher will fork them
    (CUDA must not start before a fork: then on the CPU). On a resumed run the module has not loaded the
    checkpoint yet: it holds the weights the run's seed gives at initialisation, the same as at the first launch.
    ``init_from_monitor``: the kNN monitor measures the encoder at init at step 0; only raw pixels are measured here.
    """
    launcher = trainer.strategy.launcher
    forks = launcher is not None and launcher.is_interactive_compatible  # ddp_fork, ddp_notebook
    device = torch.device("cpu") if forks else trainer.strategy.root_device
    before = next(model.parameters()).device
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        report.rows["raw pixels"] = KNNReport.measure(lambda x: x.flatten(1), datamodule, device=device)
        if init_from_monitor:
            log.info("kNN top-1 before training: raw pixels %.4f (the encoder at init: the kNN monitor's first "
                     "pass)", report.rows["raw pixels"])
            return
        report.rows["encoder at init"] = KNNReport.measure(model.embed, datamodule, model, device)
    except DatasetNotAvailableError:
        raise  # the dataset is not there: training would fail too
    except Exception as err:  # noqa: BLE001 - the report is an extra (no validation images...): never stops a run
        log.warning("knn_report skipped (%s); training goes on", f"{type(err).__name__}: {err}".splitlines()[0])
        report.rows.clear()
        return
    finally:
        model.to(before)
    log.info("kNN top-1 before training%s: raw pixels %.4f, encoder at init %.4f",
             " (the encoder at init of this seed; the run resumes from its checkpoint)" if resumed else "",
             report.rows["raw pixels"], report.rows["encoder at init"])


def _report_after_training(report: KNNReport, datamodule: Any, model: torch.nn.Module, trainer: L.Trainer) -> None:
    """Measure the trained encoder and print the kNN table once; one line instead when it fails.

    Every process takes part, each embedding its shard on its training device (the module is back on the CPU
    after ``fit``; NCCL gathers only device tensors), and all get the one-process number.
    """
    try:
        report.rows["trained encoder"] = KNNReport.measure(model.embed, datamodule, model,
                                                           trainer.strategy.root_device)
    except Exception as err:  # noqa: BLE001 - the report is an extra: it never fails a finished run
        if trainer.is_global_zero:
            log.warning("knn_report skipped (%s)", f"{type(err).__name__}: {err}".splitlines()[0])
        return
    if trainer.is_global_zero:
        _print_and_log(report.table())


def _print_and_log(text: str) -> None:
    """Print ``text`` (the end-of-run summary) as it is, and write it to the run's log file (train.log) as well.

    Printed rather than logged on the console, so that the table reads without a log prefix; the file handlers
    (Hydra's ``hydra.job_logging``) get it as an INFO record of this module, without a second console copy.
    """
    print(text, flush=True)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def _print_embedding_map(trainer: L.Trainer) -> None:
    """Say where the embedding map of the trained encoder is (callbacks.embedding_map), next to the kNN table."""
    from moco_lightning.eval.embedding_map import EmbeddingMap

    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if not isinstance(callback, EmbeddingMap) or not trainer.is_global_zero:
            continue
        if callback.skipped is not None:
            _print_and_log(f"embedding map: not drawn ({callback.skipped})")
        elif callback.last_path is not None:
            _print_and_log(f"embedding map: {callback.last_path}")


#: Hydra's command-line flags that take a value (kept for a sweep job's other processes, with their value).
_HYDRA_VALUE_FLAGS = ("-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir")


@contextmanager
def _processes_run_this_job() -> Iterator[None]:
    """In a sweep job (``-m``), start the job's other processes with the job's settings alone, not the sweep.

    Lightning starts ranks 1..N-1 of a run with this process's ``sys.argv`` and ``hydra.run.dir`` set to Hydra's
    run folder; in a sweep that command is the whole sweep, which every such process would run again, joining
    whichever job rank 0 is in. For the job, ``sys.argv`` becomes Hydra's flags and the job's own overrides
    (without ``-m``) and the run folder the job's; both come back afterwards, with the environment Lightning's
    launcher set (``LOCAL_RANK`` would make the next job's Lightning wait for processes nobody starts), and the
    job's process group is closed, so the next job starts its own processes. Outside a sweep: nothing.
    """
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    job = HydraConfig.get()
    argv, environ, run_dir = list(sys.argv), dict(os.environ), job.run.dir
    flags, rest = [], iter(argv[1:])
    for arg in rest:
        if arg in _HYDRA_VALUE_FLAGS:
            flags += [arg, next(rest, "")]
        elif arg.startswith("-") and arg not in ("-m", "--multirun"):
            flags.append(arg)  # --config-name=x and the like
    sys.argv = [argv[0], *flags, *job.overrides.task]
    with read_write(job):
        job.run.dir = job.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
        with read_write(job):
            job.run.dir = run_dir
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    with _processes_run_this_job():
        return train(cfg)


def main() -> None:
    """Console entry point: check the group options named on the command line, then run Hydra."""
    exit_on_bad_command_line(CONFIG_PATH, "train")
    exit_on_missing_extra(sys.argv[1:])  # hparams_search=optuna, hydra/launcher=slurm without their extra
    _hydra_main()


if __name__ == "__main__":
    main()
