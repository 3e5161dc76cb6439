"""Every option of every config group composes, resolves and instantiates (without training)."""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from moco_lightning import BACKBONES, MoCo, MoCoV3
from moco_lightning.backbones import VITS
from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.config_checks import group_options
from moco_lightning.data import MoCoDataModule

GROUPS = sorted(p.name for p in Path(CONFIG_PATH).iterdir() if p.is_dir() and not p.name.startswith("_"))
#: recipes live in one folder per model family: conf/recipe/<family>/<data>_<backbone>.yaml
RECIPES = sorted(f"{p.parent.name}/{p.stem}" for p in Path(CONFIG_PATH, "recipe").glob("*/*.yaml"))
#: settings of a model family for a backbone family: conf/backbone_recipe/<model_family>/<backbone_family>.yaml
BACKBONE_RECIPES = sorted(f"{p.parent.name}/{p.stem}" for p in Path(CONFIG_PATH, "backbone_recipe").glob("*/*.yaml"))
NESTED = {"recipe": RECIPES, "backbone_recipe": BACKBONE_RECIPES}
OPTIONS = [(group, option) for group in GROUPS
           for option in NESTED.get(group) or group_options(CONFIG_PATH, group)]
#: a model of each family (conf/model_family/), the one its recipes are for
FAMILY_MODEL = {"moco": "mocov2", "mocov3": "mocov3"}
#: a backbone of each backbone family (conf/backbone_family/)
FAMILY_BACKBONE = {"resnet": "resnet50", "vit": "vit_small"}


def _has_optuna_sweeper() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
    except ModuleNotFoundError:
        return False


HAS_OPTUNA_SWEEPER = _has_optuna_sweeper()
CPU_ONLY = ["trainer.accelerator=cpu"] if not torch.cuda.is_available() else []


def _group_overrides(group: str, option: str, tmp_path: Path) -> list[str]:
    if group == "recipe":  # recipes are chosen by the model family + data + backbone they are named after
        family, pair = option.split("/")
        data = max((d for d in group_options(CONFIG_PATH, "data") if pair.startswith(f"{d}_")), key=len)
        backbone = pair.removeprefix(f"{data}_")  # both may hold an underscore (fashion_mnist, vit_small)
        return [f"model={FAMILY_MODEL[family]}", f"data={data}", f"backbone={backbone}"]
    if group == "model_family":  # set by the model file: the family's own model
        return [f"model={FAMILY_MODEL[option]}"]
    if group == "backbone_family":  # set by the backbone file: a backbone of the family (ViTs: MoCo v3 only)
        return [f"backbone={FAMILY_BACKBONE[option]}", *(["model=mocov3"] if option == "vit" else [])]
    if group == "backbone_recipe":  # chosen by the model family + backbone family it is named after
        family, backbone_family = option.split("/")
        return [f"model={FAMILY_MODEL[family]}", f"backbone={FAMILY_BACKBONE[backbone_family]}"]
    overrides = [f"{group}={option}"]
    if group == "backbone" and option in VITS:  # ViTs are MoCo v3 backbones
        overrides.append("model=mocov3")
    if (group, option) in (("data", "imagefolder"), ("experiment", "my_images")):
        overrides.append(f"data.data_dir={tmp_path}")
    return overrides


def test_every_group_has_options():
    expected = {"backbone", "callbacks", "data", "experiment", "hparams_search", "logger", "model", "recipe",
                "trainer", "model_family", "backbone_family", "backbone_recipe"}
    assert expected <= set(GROUPS)
    assert {"resnet18", "resnet34", "resnet50", "vit_small", "vit_base", "vit_conv_small", "vit_conv_base"} <= set(
        group_options(CONFIG_PATH, "backbone"))
    assert {"mocov3/resnet", "mocov3/vit"} <= set(BACKBONE_RECIPES)
    assert {"mocov1", "mocov2", "mocov3"} <= set(group_options(CONFIG_PATH, "model"))
    assert {"moco/digits_resnet18", "mocov3/digits_resnet18", "mocov3/imagenet_resnet50",
            "mocov3/imagenet_vit_small"} <= set(RECIPES)
    assert {"digits", "cifar10", "cifar100", "stl10", "imagenet", "imagefolder"} <= set(
        group_options(CONFIG_PATH, "data"))
    assert {"default", "cpu", "gpu", "ddp"} <= set(group_options(CONFIG_PATH, "trainer"))
    assert {"csv", "tensorboard", "wandb", "many"} <= set(group_options(CONFIG_PATH, "logger"))


# linear_protocol and finetune_recipe: groups of eval_linear.yaml and eval_finetune.yaml
TRAIN_OPTIONS = [(g, o) for g, o in OPTIONS if g not in ("linear_protocol", "finetune_recipe")]


@pytest.mark.parametrize(("group", "option"), TRAIN_OPTIONS, ids=[f"{g}/{o}" for g, o in TRAIN_OPTIONS])
def test_option_composes_and_instantiates(group, option, compose_train, tmp_path):
    if group == "hparams_search" and option == "optuna" and not HAS_OPTUNA_SWEEPER:
        pytest.skip("hydra-optuna-sweeper is an optional extra (pip install 'moco-lightning[optuna]')")
    overrides = [*_group_overrides(group, option, tmp_path), *CPU_ONLY]
    cfg = compose_train(overrides)
    if group in NESTED:  # the recipe the model family + data + backbone (family) pick is this file
        assert compose_train(overrides, return_hydra_config=True).hydra.runtime.choices[group] == option
    if group in ("model_family", "backbone_family"):
        assert compose_train(overrides, return_hydra_config=True).hydra.runtime.choices[group] == option
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    backbone = container["model"]["backbone"]
    assert backbone in BACKBONES or (group == "backbone" and option == "timm" and backbone == "timm:resnet18")

    if group in ("data", "experiment", "recipe"):
        assert isinstance(instantiate(cfg.data), MoCoDataModule)
    if group in ("model", "backbone", "experiment", "recipe", "model_family", "backbone_family", "backbone_recipe"):
        if cfg.model.backbone in VITS and (group, option) != ("backbone", "vit_small"):
            # building a ViT-B or a 224 px ViT twice (base and momentum encoder) takes seconds: bind the
            # arguments; backbone/vit_small builds one for real
            inspect.signature(MoCoV3).bind(**{k: v for k, v in container["model"].items() if k != "_target_"})
        else:
            model = instantiate(cfg.model)
            assert isinstance(model, MoCoV3 if cfg.model._target_.endswith("MoCoV3") else MoCo)
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
        swept = set(hydra_cfg.sweeper.params)
        expected = {"bn_leak": {"model.bn"}, "dictionary_size": {"model.queue_size"},
                    "momentum": {"model.momentum"}}.get(option)
        assert swept == expected if expected else {"model.momentum", "model.queue_size"} <= swept
        if option == "bn_leak":  # split against the two leaks: its groups without the shuffle, and plain BN
            assert str(hydra_cfg.sweeper.params["model.bn"]).split(",") == ["split", "split_noshuffle", "none"]


def test_fashion_mnist_claims_sweeps_share_one_budget_and_start_at_one_batch(compose_train):
    # the dictionary sweeps run the recipe at one fixed budget below its own; the smallest queue is one batch (the
    # smallest MoCo allows), every queue is a whole number of batches, and the momentum sweep has m = 0 (Table 1)
    recipe = compose_train(["experiment=fashion_mnist"])
    for option in ("dictionary_size", "momentum", "bn_leak"):
        overrides = ["experiment=fashion_mnist", f"hparams_search={option}"]
        cfg = compose_train(overrides)
        assert cfg.data.batch_size == recipe.data.batch_size
        assert cfg.trainer.max_epochs < recipe.trainer.max_epochs and cfg.data.image_size <= recipe.data.image_size
        assert cfg.callbacks.knn.every_n_epochs == 1  # the report reads the last epoch's val/knn_top1
        params = compose_train(overrides, return_hydra_config=True).hydra.sweeper.params
        if option == "bn_leak":  # as measured: T 0.2 and no warm-up (the recipe's would fill most of a job this short)
            assert recipe.model.warmup_epochs > 0 and (cfg.model.warmup_epochs, cfg.model.temperature) == (0, 0.2)
            continue
        assert cfg.trainer.max_epochs >= 5  # where the claims can show (a one-epoch job ends below its init)
        assert cfg.model.warmup_epochs == recipe.model.warmup_epochs  # the recipe otherwise
        assert cfg.model.temperature == recipe.model.temperature
        if option == "dictionary_size":
            queues = [int(k) for k in str(params["model.queue_size"]).split(",")]
            assert min(queues) == cfg.data.batch_size and all(k % cfg.data.batch_size == 0 for k in queues)
            assert cfg.model.momentum == recipe.model.momentum
        else:
            assert "0.0" in str(params["model.momentum"]).split(",")  # the paper's "no momentum" arm
            assert cfg.model.queue_size == 4096  # the K of the paper's momentum ablation


def test_recipe_follows_the_data_backbone_pair(compose_train):
    digits = compose_train()
    assert digits.model.queue_size < 1437 and digits.trainer.max_epochs < 200  # the measured digits recipe
    other_backbone = compose_train(["backbone=resnet34"])
    assert other_backbone.model.queue_size == 65536  # no recipe for digits_resnet34: the official settings


def test_mocov1_and_mocov2_share_the_moco_recipes(compose_train):
    v1, v2 = compose_train(["model=mocov1"]), compose_train()
    assert v1.model.mlp is False and v2.model.mlp is True
    for key in ("queue_size", "temperature", "lr", "cifar_stem"):
        assert v1.model[key] == v2.model[key], key
    assert v1.data == v2.data and v1.trainer == v2.trainer


def test_mocov3_gets_its_own_recipes_not_the_queue_ones(compose_train):
    cfg = compose_train(["model=mocov3"], return_hydra_config=True)
    assert cfg.hydra.runtime.choices.recipe == "mocov3/digits_resnet18"
    assert cfg.model._target_ == "moco_lightning.MoCoV3" and "queue_size" not in cfg.model
    imagenet = compose_train(["model=mocov3", "data=imagenet", "backbone=vit_small"])
    assert (imagenet.model.optimizer, imagenet.model.temperature, imagenet.model.warmup_epochs) == ("adamw", 0.2, 40)
    assert imagenet.data.augmentation == "v3" and imagenet.trainer.max_epochs == 300


def test_v3_experiments_are_the_official_recipes(compose_train):
    from global_batch import config_images_per_step

    r50 = compose_train(["experiment=imagenet_mocov3_resnet50", *CPU_ONLY])
    assert (r50.model.optimizer, r50.model.lr, r50.model.weight_decay, r50.model.temperature) == (
        "lars", 0.6, 1e-6, 1.0)
    assert r50.model.zero_init_residual is True and r50.model.momentum_schedule == "cosine"
    assert config_images_per_step(r50) == 4096 and r50.trainer.max_epochs == 100 and r50.model.warmup_epochs == 10
    vit = compose_train(["experiment=imagenet_mocov3_vit_small", *CPU_ONLY])
    assert (vit.model.optimizer, vit.model.lr, vit.model.weight_decay, vit.model.temperature) == (
        "adamw", 1.5e-4, 0.1, 0.2)
    assert config_images_per_step(vit) == 4096 and vit.trainer.max_epochs == 300 and vit.model.freeze_patch_embed
    assert vit.data.augmentation_kwargs.crop_scale == [0.08, 1.0] and (vit.model.patch_size, vit.model.image_size) == (
        16, 224)


def test_vit_patch_follows_the_image_size(compose_train):
    cifar = compose_train(["model=mocov3", "backbone=vit_small", "data=cifar10"])
    assert (cifar.model.image_size, cifar.model.patch_size) == (32, 4)
    assert compose_train(["model=mocov3", "backbone=vit_base", "data=stl10"]).model.patch_size == 16


@pytest.mark.parametrize("protocol", group_options(CONFIG_PATH, "linear_protocol"))
def test_linear_protocols_compose_for_eval_linear(protocol, tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        cfg = compose("eval_linear", overrides=[f"linear_protocol={protocol}", "checkpoint=x.ckpt",
                                                f"paths.output_dir={tmp_path}"])
    assert cfg.protocol == protocol
    if protocol == "features":  # not an SGD protocol: L-BFGS on frozen features, L2 chosen on held-out data
        assert cfg.l2_grid and 0.0 < cfg.holdout_fraction < 1.0 and cfg.dtype in ("float32", "float64")
        return
    expected = {"moco": (30.0, False, "step", 100), "mocov3": (0.1, True, "cosine", 90)}[protocol]
    assert (cfg.lr, cfg.scale_lr, cfg.schedule, cfg.trainer.max_epochs) == expected
    assert cfg.weight_decay == 0.0 and cfg.momentum == 0.9


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


def test_digits_recipe_uses_plain_bn_on_one_process_and_shuffle_bn_on_several(compose_train):
    assert compose_train([]).model.bn == "none"  # measured best on one device (benchmarks/RESULTS.md)
    assert compose_train(["trainer.devices=2", "trainer.accelerator=cpu"]).model.bn == "shuffle"
    assert compose_train(["trainer.num_nodes=2"]).model.bn == "shuffle"


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
