"""Every option of every config group composes, resolves and instantiates (without training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moco_lightning import MoCo
from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.config_checks import group_options
from moco_lightning.data import MoCoDataModule

GROUPS = sorted(p.name for p in Path(CONFIG_PATH).iterdir() if p.is_dir() and not p.name.startswith("_"))
OPTIONS = [(group, option) for group in GROUPS for option in group_options(CONFIG_PATH, group)]


def _has_optuna_sweeper() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:
        return False


HAS_OPTUNA_SWEEPER = _has_optuna_sweeper()
CPU_ONLY = ["trainer.accelerator=cpu"] if not torch.cuda.is_available() else []


def _group_overrides(group: str, option: str, tmp_path: Path) -> list[str]:
    if group == "recipe":  # recipes are chosen by the data + backbone pair they are named after
        data, backbone = option.rsplit("_", 1)
        return [f"data={data}", f"backbone={backbone}"]
    overrides = [f"{group}={option}"]
    if (group, option) == ("data", "imagefolder"):
        overrides.append(f"data.data_dir={tmp_path}")
    return overrides


def test_every_group_has_options():
    expected = {"backbone", "callbacks", "data", "experiment", "hparams_search", "logger", "model", "recipe",
                "trainer"}
    assert expected <= set(GROUPS)
    assert {"resnet18", "resnet34", "resnet50"} <= set(group_options(CONFIG_PATH, "backbone"))
    assert {"digits", "cifar10", "cifar100", "stl10", "imagenet", "imagefolder"} <= set(
        group_options(CONFIG_PATH, "data"))
    assert {"default", "cpu", "gpu", "ddp"} <= set(group_options(CONFIG_PATH, "trainer"))
    assert {"csv", "tensorboard", "wandb", "many"} <= set(group_options(CONFIG_PATH, "logger"))


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}/{o}" for g, o in OPTIONS])
def test_option_composes_and_instantiates(group, option, compose_train, tmp_path):
    if group == "hparams_search" and option == "optuna" and not HAS_OPTUNA_SWEEPER:
        pytest.skip("hydra-optuna-sweeper is an optional extra (pip install 'moco-lightning[optuna]')")
    overrides = [*_group_overrides(group, option, tmp_path), *CPU_ONLY]
    cfg = compose_train(overrides)
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert container["model"]["backbone"] in ("resnet18", "resnet34", "resnet50")

    if group in ("data", "experiment", "recipe"):
        assert isinstance(instantiate(cfg.data), MoCoDataModule)
    if group in ("model", "backbone", "experiment", "recipe"):
        model = instantiate(cfg.model)
        assert isinstance(model, MoCo)
        assert model.hparams.backbone == cfg.model.backbone
    if group in ("trainer", "experiment"):
        trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
        assert isinstance(trainer, L.Trainer)
    if group in ("callbacks", "logger"):
        objects = [instantiate(node) for node in cfg[group].values()]
        assert objects, f"{group}={option} builds nothing"
        base = L.Callback if group == "callbacks" else L.pytorch.loggers.Logger
        assert all(isinstance(obj, base) for obj in objects)
    if group == "hparams_search":
        hydra_cfg = compose_train(overrides, return_hydra_config=True).hydra
        assert hydra_cfg.mode.name == "MULTIRUN"
        assert {"model.momentum", "model.queue_size"} <= set(hydra_cfg.sweeper.params)


def test_recipe_follows_the_data_backbone_pair(compose_train):
    digits = compose_train()
    assert digits.model.queue_size < 1437 and digits.trainer.max_epochs < 200  # the measured digits recipe
    other_backbone = compose_train(["backbone=resnet34"])
    assert other_backbone.model.queue_size == 65536  # no recipe for digits_resnet34: the official settings


def test_cifar_stem_follows_the_image_size_and_can_be_forced(compose_train):
    assert compose_train(["data=cifar10"]).model.cifar_stem is True
    assert compose_train(["data=stl10"]).model.cifar_stem is False
    assert compose_train(["data=stl10", "model.cifar_stem=true"]).model.cifar_stem is True


def test_wandb_is_offline_without_a_login(compose_train, monkeypatch, tmp_path):
    for variable in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert compose_train(["logger=wandb"]).logger.wandb.offline is True
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setattr("moco_lightning.cli._reachable", lambda host, port: True)
    assert compose_train(["logger=wandb"]).logger.wandb.offline is False


def test_wandb_is_offline_when_logged_in_without_network(compose_train, monkeypatch):
    import socket
    import time

    from moco_lightning.cli import _reachable

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    with socket.socket() as probe:  # a local port with nothing listening: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    _reachable.cache_clear()
    start = time.monotonic()
    assert compose_train(["logger=wandb"]).logger.wandb.offline is True
    assert time.monotonic() - start < 10  # no wait for wandb's own connection timeout


def test_the_default_run_checkpoints_atomically_and_can_resume_and_be_preempted(compose_train):
    from moco_lightning.checkpointing import AtomicCheckpointIO, PreemptionCheckpoint, ResumeState
    from moco_lightning.cli.train import build
    from moco_lightning.nonfinite import NonFiniteLossGuard

    cfg = compose_train(["trainer.accelerator=cpu"])
    _, _, trainer = build(cfg)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    kinds = {type(callback) for callback in trainer.callbacks}
    assert {ResumeState, PreemptionCheckpoint, NonFiniteLossGuard} <= kinds
    folders = {callback.dirpath for callback in trainer.checkpoint_callbacks}
    assert len(trainer.checkpoint_callbacks) == 3 and len(folders) == 1  # last, best, step: one folder for auto
    assert cfg.callbacks.step_checkpoint.every_n_train_steps == 1000
