"""MoCo v3 in the configs: the v3 recipe on every dataset, the official runs as experiments, the README's commands.

The rule under test (conf/train.yaml): the model family decides the augmentation (``model=mocov3``: v3's asymmetric
pair at the dataset's image size and with its statistics), the backbone family decides the optimiser (any ViT: the
official ViT settings; any ResNet: the official ResNet-50 LARS ones), and a recipe for the data + backbone pair
(conf/recipe/mocov3/) overrides both.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.utils import instantiate
from torchvision.transforms import v2

from global_batch import config_images_per_step
from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.config_checks import check_config, group_options
from moco_lightning.transforms import (
    CIFAR10_MEAN,
    CIFAR100_MEAN,
    DIGITS_MEAN,
    FASHION_MNIST_MEAN,
    IMAGENET_MEAN,
    KMNIST_MEAN,
    MNIST_MEAN,
    STL10_MEAN,
    GaussianBlur,
    RandomSolarize,
)

from .conftest import REPO

#: what the family rule gives, per backbone family: (optimizer, lr per 256, T, weight decay, warm-up epochs)
VIT = ("adamw", 1.5e-4, 0.2, 0.1, 40)
RESNET = ("lars", 0.6, 1.0, 1e-6, 10)
#: the statistics each dataset is normalised with
MEANS = {"digits": DIGITS_MEAN, "cifar10": CIFAR10_MEAN, "cifar100": CIFAR100_MEAN, "stl10": STL10_MEAN,
         "imagenet": IMAGENET_MEAN, "imagefolder": IMAGENET_MEAN, "fashion_mnist": FASHION_MNIST_MEAN,
         "mnist": MNIST_MEAN, "kmnist": KMNIST_MEAN}
#: (data, backbone) -> (augmentation, crop scale, optimizer, lr per 256, T, weight decay, warm-up epochs), with
#: model=mocov3. One row per data option x {resnet50, vit_small}; the recipe files show where they differ.
TABLE = {
    **{(data, "resnet50"): ("v3", (0.08, 1.0), *RESNET) for data in MEANS},
    **{(data, "vit_small"): ("v3", (0.08, 1.0), *VIT) for data in MEANS},
    ("imagenet", "resnet50"): ("v3", (0.2, 1.0), *RESNET),  # recipe/mocov3/imagenet_resnet50: --crop-min=.2
    # recipe/mocov3/digits_resnet18: measured on digits (benchmarks/RESULTS.md, "MoCo v3 digits recipe")
    ("digits", "resnet18"): ("digits", (0.7, 1.0), "lars", 4.8, 0.1, 1e-6, 1),
    # recipe/mocov3/fashion_mnist_resnet18: the v2 recipe's grey augmentation (benchmarks/RESULTS.md)
    ("fashion_mnist", "resnet18"): ("grey", (0.2, 1.0), "lars", 2.4, 0.05, 1e-6, 1),
}


def _compose_v3(compose_train, data: str, backbone: str, tmp_path: Path):
    overrides = ["model=mocov3", f"data={data}", f"backbone={backbone}", "trainer.accelerator=cpu"]
    if data in ("imagefolder", "imagenet"):  # folders the config check finds (nothing is read)
        for sub in ("train", "val"):
            (tmp_path / sub).mkdir(exist_ok=True)
        overrides.append(f"data.data_dir={tmp_path}")
    return compose_train(overrides)


def _ops(transform) -> list[tuple[object, float]]:
    """The transforms of a v2.Compose, RandomApply unwrapped: [(op, p)]."""
    out = []
    for t in transform.transforms:
        out += [(inner, t.p) for inner in t.transforms] if isinstance(t, v2.RandomApply) else [(t, 1.0)]
    return out


def test_the_table_covers_every_data_option():
    assert {data for data, _ in TABLE} == set(group_options(CONFIG_PATH, "data")) == set(MEANS)


@pytest.mark.parametrize(("data", "backbone"), sorted(TABLE), ids=[f"{d}-{b}" for d, b in sorted(TABLE)])
def test_mocov3_gets_the_v3_recipe_on_every_dataset(compose_train, tmp_path, data, backbone):
    augmentation, crop_scale, optimizer, lr, temperature, weight_decay, warmup = TABLE[data, backbone]
    cfg = _compose_v3(compose_train, data, backbone, tmp_path)
    check_config(cfg)
    model = cfg.model
    assert (model.optimizer, model.warmup_epochs) == (optimizer, warmup)
    assert model.lr == pytest.approx(lr, rel=1e-9) and model.temperature == pytest.approx(temperature, rel=1e-9)
    assert model.weight_decay == pytest.approx(weight_decay, rel=1e-9)
    assert cfg.data.augmentation == augmentation

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.batch_augmentation = False  # the per-image recipe (the batched one is built from it)
    pair = datamodule.pretrain_transform
    for view in (pair.transform_1, pair.transform_2):
        ops = _ops(view)
        crop = next(op for op, _ in ops if isinstance(op, v2.RandomResizedCrop))
        assert tuple(crop.size) in ((cfg.data.image_size,), (cfg.data.image_size,) * 2)  # the dataset's size
        assert tuple(crop.scale) == pytest.approx(crop_scale)
        normalize = next(op for op, _ in ops if isinstance(op, v2.Normalize))
        assert tuple(normalize.mean) == pytest.approx(MEANS[data])  # the dataset's statistics
    if augmentation == "v3":  # the asymmetric pair: blur 1.0 / 0.1, solarize only in the second view
        blur = [next(p for op, p in _ops(view) if isinstance(op, GaussianBlur))
                for view in (pair.transform_1, pair.transform_2)]
        solarize = [next(op.p for op, _ in _ops(view) if isinstance(op, RandomSolarize))
                    for view in (pair.transform_1, pair.transform_2)]
        assert blur == [1.0, 0.1] and solarize == [0.0, 0.2]


@pytest.mark.parametrize(("data", "zero_init"), [("digits", False), ("fashion_mnist", True), ("cifar10", True)])
def test_the_residual_bn_init_is_the_measured_one_per_dataset(compose_train, tmp_path, data, zero_init):
    # digits start far higher without the zero-initialised residual BNs; Fashion-MNIST learns faster with them
    # (benchmarks/RESULTS.md); every other dataset keeps the official zero-init
    assert _compose_v3(compose_train, data, "resnet18", tmp_path).model.zero_init_residual is zero_init


def test_every_vit_and_resnet_gets_its_family_settings(compose_train, tmp_path):
    for backbone, family in (("vit_base", VIT), ("vit_conv_small", VIT), ("vit_conv_base", VIT), ("resnet34", RESNET)):
        model = _compose_v3(compose_train, "stl10", backbone, tmp_path).model
        got = (model.optimizer, model.lr, model.temperature, model.weight_decay, model.warmup_epochs)
        assert got == pytest.approx(family), backbone


def test_mocov1_and_v2_keep_their_own_augmentation_and_optimiser(compose_train):
    cfg = compose_train(["model=mocov2", "data=cifar10", "backbone=resnet50"])
    assert cfg.data.augmentation == "v2" and cfg.model.optimizer == "sgd" and cfg.model.lr == pytest.approx(0.03)


# ---------------------------------------------------------------------------------------------- official runs
#: experiment -> (backbone, nodes, global batch, epochs, lr per 256, weight decay, m0, crop scale),
#: facebookresearch/moco-v3 CONFIG.md
OFFICIAL = {
    "imagenet_mocov3_resnet50": ("resnet50", 2, 4096, 100, 0.6, 1e-6, 0.99, (0.2, 1.0)),
    "imagenet_mocov3_resnet50_300ep": ("resnet50", 2, 4096, 300, 0.3, 1e-6, 0.99, (0.2, 1.0)),
    "imagenet_mocov3_resnet50_1000ep": ("resnet50", 2, 4096, 1000, 0.3, 1.5e-6, 0.996, (0.2, 1.0)),
    "imagenet_mocov3_vit_small": ("vit_small", 4, 4096, 300, 1.5e-4, 0.1, 0.99, (0.08, 1.0)),
    "imagenet_mocov3_vit_base": ("vit_base", 8, 4096, 300, 1.5e-4, 0.1, 0.99, (0.08, 1.0)),
}


@pytest.mark.parametrize("experiment", sorted(OFFICIAL))
def test_official_v3_runs_are_experiments(compose_train, experiment):
    backbone, nodes, batch, epochs, lr, weight_decay, momentum, crop_scale = OFFICIAL[experiment]
    cfg = compose_train([f"experiment={experiment}", "data.data_dir=/datasets/imagenet", "trainer.accelerator=cpu"])
    model = cfg.model
    assert (model.backbone, cfg.trainer.num_nodes, cfg.trainer.devices) == (backbone, nodes, 8)
    assert config_images_per_step(cfg) == batch and cfg.trainer.max_epochs == epochs
    assert model.lr == pytest.approx(lr) and model.weight_decay == pytest.approx(weight_decay)
    assert model.momentum == pytest.approx(momentum) and model.momentum_schedule == "cosine"
    assert tuple(cfg.data.augmentation_kwargs.crop_scale) == pytest.approx(crop_scale)
    assert cfg.data.augmentation == "v3" and cfg.trainer.precision == "16-mixed" and model.bn == "sync"
    assert model.optimizer == ("adamw" if backbone.startswith("vit") else "lars")


# ---------------------------------------------------------------------------------------------- README
#: What each command line of the README's "MoCo v3" section claims, checked on the config it composes
#: (``--cfg job --resolve``). Keys are dotted config paths; "global_batch" is batch x devices x nodes.
README_CLAIMS: dict[str, dict[str, object]] = {
    "train.py model=mocov3": {
        "model._target_": "moco_lightning.MoCoV3", "model.backbone": "resnet18",
        "data._target_": "moco_lightning.data.DigitsDataModule", "data.augmentation": "digits",
    },
    "train.py model=mocov3 backbone=vit_small data=cifar10": {
        "model.backbone": "vit_small", "model.patch_size": 4, "model.image_size": 32, "data.augmentation": "v3",
        "model.optimizer": "adamw", "model.lr": 1.5e-4, "model.temperature": 0.2, "model.warmup_epochs": 40,
    },
    "train.py model=mocov3 backbone=resnet50 data=cifar10": {
        "model.backbone": "resnet50", "model.cifar_stem": True, "data.augmentation": "v3", "model.optimizer": "lars",
        "model.lr": 0.6, "model.temperature": 1.0,
    },
    "train.py experiment=imagenet_mocov3_resnet50 data.data_dir=/datasets/imagenet": {
        "model.backbone": "resnet50", "trainer.num_nodes": 2, "trainer.devices": 8, "global_batch": 4096,
        "trainer.max_epochs": 100, "model.lr": 0.6,
    },
    "train.py experiment=imagenet_mocov3_resnet50_300ep data.data_dir=/datasets/imagenet": {
        "trainer.num_nodes": 2, "global_batch": 4096, "trainer.max_epochs": 300, "model.lr": 0.3,
    },
    "train.py experiment=imagenet_mocov3_resnet50_1000ep data.data_dir=/datasets/imagenet": {
        "trainer.num_nodes": 2, "global_batch": 4096, "trainer.max_epochs": 1000, "model.lr": 0.3,
        "model.weight_decay": 1.5e-6, "model.momentum": 0.996,
    },
    "train.py experiment=imagenet_mocov3_vit_small data.data_dir=/datasets/imagenet": {
        "model.backbone": "vit_small", "trainer.num_nodes": 4, "trainer.devices": 8, "global_batch": 4096,
        "trainer.max_epochs": 300,
    },
    "train.py experiment=imagenet_mocov3_vit_base data.data_dir=/datasets/imagenet": {
        "model.backbone": "vit_base", "trainer.num_nodes": 8, "trainer.devices": 8, "global_batch": 4096,
        "trainer.max_epochs": 300,
    },
    "eval_linear.py linear_protocol=mocov3 checkpoint=.../last.ckpt data=imagenet data.data_dir=...": {
        "lr": 0.1, "scale_lr": True, "schedule": "cosine", "trainer.max_epochs": 90, "batch_size": 1024,
    },
}
#: the entry point behind each script of the repository root
ENTRY_POINTS = {"train.py": "moco_lightning.cli.train", "eval_linear.py": "moco_lightning.cli.eval_linear"}
#: runs each command line through its real entry point (Hydra's @main) in one process: argv in, YAML out
_RUNNER = """
import importlib, json, sys
for module, args in json.loads(sys.argv[1]):
    sys.argv = ["x.py", *args, "--cfg", "job", "--resolve"]
    print("=== config ===", flush=True)
    importlib.import_module(module).main()
"""


def readme_v3_commands() -> list[str]:
    """The ``python <script>.py ...`` lines of the "## MoCo v3" section of the docs (comments stripped).

    The README's own v3 lines are in that page too (docs/models.md, which the README links).
    """
    text = (REPO / "docs" / "models.md").read_text()
    section = text.split("\n## MoCo v3\n", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("#", 1)[0].strip() for line in section.splitlines()]
    return [re.sub(r"^python ", "", line) for line in lines if re.match(r"python \w+\.py ", line)]


def _get(cfg: dict, dotted: str) -> object:
    if dotted == "global_batch":
        trainer = cfg["trainer"]
        return cfg["data"]["batch_size"] * trainer["devices"] * trainer["num_nodes"]
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


@pytest.mark.timeout(300)
def test_readme_v3_commands_compose_to_what_they_claim():
    commands = [c for c in readme_v3_commands() if not c.startswith("export.py")]  # moco-export: no Hydra config
    assert set(commands) == set(README_CLAIMS), "every README v3 command line has its claims here, and only those"
    jobs = []
    for command in commands:
        script, *args = shlex.split(command)
        jobs.append([ENTRY_POINTS[script], args])
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="1")
    out = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(jobs)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=280)
    assert out.returncode == 0, out.stderr[-2000:]
    configs = [yaml.safe_load(part) for part in out.stdout.split("=== config ===\n")[1:]]
    assert len(configs) == len(commands)
    for command, cfg in zip(commands, configs, strict=True):
        for key, expected in README_CLAIMS[command].items():
            got = _get(cfg, key)
            if isinstance(expected, float):
                assert got == pytest.approx(expected, rel=1e-9), f"{command}: {key}"
            else:
                assert got == expected, f"{command}: {key}"


# ---------------------------------------------------------------------------------------------- bn
def test_mocov3_bn_takes_the_v3_values_and_refuses_the_queue_ones(compose_train):
    from moco_lightning.cli.config_checks import ConfigError

    assert compose_train(["model=mocov3"]).model.bn == "sync"  # the official SyncBN
    check_config(compose_train(["model=mocov3", "model.bn=none"]))
    with pytest.raises(ConfigError, match="model.bn=split is not a BN mode of MoCo v3; choose one of auto, sync, none"):
        check_config(compose_train(["model=mocov3", "model.bn=split"]))
    with pytest.raises(ConfigError, match="trainer.sync_batchnorm=true"):
        check_config(compose_train(["model=mocov3", "trainer.sync_batchnorm=true"]))
