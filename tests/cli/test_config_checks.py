"""Each wrong value is a one-line ConfigError naming the key, raised before anything is built."""

from __future__ import annotations

import re

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.config_checks import (
    ConfigError,
    check_accelerator,
    check_command_line,
    check_config,
)


def _error(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_default_config_passes(compose_train):
    check_config(compose_train())


@pytest.mark.parametrize("overrides", [["model=mocov3"], ["model=mocov3", "backbone=vit_small"],
                                       ["model=mocov3", "backbone=vit_base", "data=cifar10"]])
def test_mocov3_configs_pass_without_a_queue(compose_train, overrides):
    check_config(compose_train(overrides))


def test_a_vit_backbone_with_mocov2_names_the_model_to_use(compose_train):
    message = _error(compose_train(["backbone=vit_small"]))
    assert "backbone=vit_small" in message and "model=mocov3" in message


def test_queue_not_a_multiple_of_the_global_batch(compose_train):
    message = _error(compose_train(["model.queue_size=1000", "data.batch_size=64"]))
    assert "model.queue_size=1000" in message and "global batch size 64" in message
    assert "model.queue_size=960" in message


def test_queue_checked_against_all_processes(compose_train):
    cfg = compose_train(["model.queue_size=192", "data.batch_size=64", "trainer.devices=2",
                         "trainer.accelerator=cpu"])
    assert "global batch size 128" in _error(cfg)


def test_symmetric_loss_needs_a_queue_multiple_of_twice_the_global_batch(compose_train):
    message = _error(compose_train(["model.symmetric=true", "model.queue_size=192", "data.batch_size=64"]))
    assert "twice the global batch size 64" in message and "model.queue_size=128 or 256" in message


@pytest.mark.parametrize(("precision", "mixed"), [("bf16-true", "bf16-mixed"), ("16-true", "16-mixed")])
def test_half_precision_weights_are_refused_for_the_momentum_update(compose_train, precision, mixed):
    message = _error(compose_train([f"trainer.precision={precision}"]))
    assert message.startswith(f"trainer.precision={precision} keeps the weights in 16 bits")
    assert f"use trainer.precision={mixed}" in message


@pytest.mark.parametrize("precision", ["32", "bf16-mixed", "16-mixed", "64-true"])
def test_float32_weights_pass(compose_train, precision):
    check_config(compose_train([f"trainer.precision={precision}"]))


def test_split_bn_on_one_device_needs_a_batch_multiple_of_the_groups(compose_train):
    tiny = ["data.batch_size=12", "model.queue_size=96"]
    message = _error(compose_train([*tiny, "model.bn=auto"]))  # auto on one process: split
    assert "data.batch_size=12 must be a multiple of model.bn_splits=8" in message and "auto" in message
    assert "model.bn=split" in _error(compose_train([*tiny, "model.bn=split"]))
    assert "model.bn=split_noshuffle" in _error(compose_train([*tiny, "model.bn=split_noshuffle"]))
    check_config(compose_train([*tiny, "model.bn=auto", "model.bn_splits=4"]))
    check_config(compose_train([*tiny, "model.bn=none"]))


def test_unknown_bn_mode_and_lightning_syncbn_are_refused(compose_train):
    assert "model.bn=group is not a BN mode" in _error(compose_train(["model.bn=group"]))
    assert "trainer.sync_batchnorm=true" in _error(compose_train(["trainer.sync_batchnorm=true"]))


@pytest.mark.parametrize("value", [0, -0.1])
def test_temperature_must_be_positive(compose_train, value):
    assert "model.temperature" in _error(compose_train([f"model.temperature={value}"]))


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_momentum_must_be_in_unit_interval(compose_train, value):
    assert "model.momentum" in _error(compose_train([f"model.momentum={value}"]))


def test_unknown_backbone_names_the_choices(compose_train):
    message = _error(compose_train(["model.backbone=resnet101"]))
    assert "model.backbone" in message
    assert "resnet18, resnet34, resnet50, vit_base, vit_conv_base, vit_conv_small, vit_small" in message


@pytest.mark.parametrize(("argument", "names"), [
    ("backbone=resnet101", ["backbone=resnet101", "resnet50"]),
    ("data=svhn", ["data=svhn", "unknown dataset", "digits", "cifar10", "imagenet", "mnist"]),
    ("data=digits,svhn", ["data=svhn"]),
    ("callbacks=[default,knnn]", ["callbacks=knnn", "online_linear"]),
])
def test_unknown_group_option_on_the_command_line(argument, names):
    with pytest.raises(ConfigError) as info:
        check_command_line([argument], CONFIG_PATH)
    assert all(name in str(info.value) for name in names) and "\n" not in str(info.value)


def test_known_options_and_keys_pass_the_command_line_check():
    check_command_line(["data=digits,cifar10", "backbone=resnet50", "model.lr=0.1", "-m", "hydra/launcher=basic",
                        "model.queue_size=range(256,1024,256)",
                        "callbacks=[default,online_linear]"], CONFIG_PATH)


def test_missing_imagenet_folder_names_the_key(compose_train, tmp_path):
    message = _error(compose_train(["data=imagenet", f"data.data_dir={tmp_path / 'nowhere'}"]))
    assert "data.data_dir" in message and "train" in message


def test_cifar_without_download_needs_the_files(compose_train, tmp_path):
    message = _error(compose_train(["data=cifar10", "data.download=false", f"data.data_dir={tmp_path}"]))
    assert "data.data_dir" in message and "data.download=true" in message


def test_misspelled_key_in_a_config_file(compose_train):
    cfg = compose_train()
    OmegaConf.set_struct(cfg, False)
    cfg.model.tempurature = 0.1  # as if an experiment YAML had the typo
    message = _error(cfg)
    assert "model.tempurature" in message and "model.temperature" in message


def test_misspelled_key_on_the_command_line_is_refused_by_hydra(compose_train):
    with pytest.raises(ConfigCompositionException, match="tempurature"):
        compose_train(["model.tempurature=0.1"])


def test_known_keys_need_no_plus(compose_train):
    cfg = compose_train(["data.num_workers=2", "trainer.precision=bf16-mixed", "model.hidden_dim=512"])
    assert (cfg.data.num_workers, cfg.trainer.precision, cfg.model.hidden_dim) == (2, "bf16-mixed", 512)


def test_missing_checkpoint(compose_train, tmp_path):
    assert "ckpt_path" in _error(compose_train([f"ckpt_path={tmp_path / 'last.ckpt'}"]))


@pytest.mark.parametrize(("override", "expected"), [
    ("model.queue_size=abc", "model.queue_size='abc' must be an integer"),
    ("model.temperature=warm", "model.temperature='warm' must be a number"),
    ("trainer.max_epochs=1.5", "trainer.max_epochs=1.5 must be an integer or null"),
    ("model.mlp=maybe", "model.mlp='maybe' must be true or false"),
])
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(compose_train, override, expected):
    assert expected in _error(compose_train([override]))


def test_devices_that_are_not_a_count_list_or_auto(compose_train):
    message = _error(compose_train(["trainer.devices=two"]))
    assert "trainer.devices='two'" in message and "auto" in message


def test_a_checkpoint_path_that_is_a_folder(compose_train, tmp_path):
    message = _error(compose_train([f"ckpt_path={tmp_path}"]))
    assert "is a folder, not a checkpoint file" in message and "ckpt_path=auto" in message


def test_auto_resume_passes_the_config_check(compose_train):
    check_config(compose_train(["ckpt_path=auto"]))


def test_resuming_with_a_global_batch_that_does_not_divide_the_queue_is_refused(compose_train, tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"")
    cfg = compose_train([f"ckpt_path={tmp_path / 'last.ckpt'}", "model.queue_size=48", "data.batch_size=16",
                         "trainer.devices=2", "trainer.accelerator=cpu"])
    message = _error(cfg)
    assert "global batch size 32" in message and "a resumed run keeps the queue of its checkpoint" in message


@pytest.mark.parametrize("size", [0, -8])
def test_image_size_must_be_a_positive_number_of_pixels(compose_train, size):
    message = _error(compose_train([f"data.image_size={size}"]))
    assert message.startswith(f"data.image_size={size} must be a positive number of pixels")


def test_gpu_accelerator_without_a_gpu_says_so(compose_train, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_config(compose_train(["trainer.accelerator=gpu"]))  # a GPU config may be checked anywhere
    with pytest.raises(ConfigError) as info:
        check_accelerator(compose_train(["trainer.accelerator=gpu"]).trainer)  # but not run without a GPU
    message = str(info.value)
    assert "trainer.accelerator=gpu but no CUDA GPU is visible" in message and "trainer.accelerator=cpu" in message


def test_a_data_dir_that_is_a_file(compose_train, tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"jpeg")
    message = _error(compose_train(["data=imagefolder", f"data.data_dir={tmp_path / 'photo.jpg'}"]))
    assert "is a file, not a folder" in message and "data.data_dir" in message


@pytest.mark.parametrize(("arguments", "expected"), [
    (["data=imagefolder", "data.img_size=64"], "data.img_size is not a setting of this config; did you mean "
                                               "data.image_size?"),
    (["model.tempurature=0.1"], "did you mean model.temperature?"),
    (["trainer.max_epoch=3", "-m"], "did you mean trainer.max_epochs?"),
    (["data=fashion_mnist", "data.augmentation_kwargs.crop_scale=[0.5,1.0]"],
     "data.augmentation_kwargs.crop_scale is not a setting of this config; data.augmentation_kwargs is empty until a "
     "key is added (to add a new key on purpose: +data.augmentation_kwargs.crop_scale=...)"),
])
def test_a_misspelt_key_on_the_command_line_names_the_closest_one(arguments, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_command_line(arguments, CONFIG_PATH)


def test_existing_added_and_hydra_keys_pass_the_key_check():
    check_command_line(["data=imagefolder,digits", "data.image_size=64", "+data.extra=1", "~callbacks.knn",
                         "hydra.run.dir=x", "callbacks=[default,online_linear]", "callbacks.online_linear.lr=0.2",
                         "model.momentum=0.99,0.999", "experiment=digits", "ckpt_path=auto"], CONFIG_PATH)


def test_a_constructor_that_refuses_its_arguments_is_one_line_naming_the_nodes_keys(compose_train):
    from moco_lightning.cli.train import build

    cfg = compose_train(["callbacks.knn.every_n_epochs=0"])  # the type is right: only KNNMonitor's own check refuses
    check_config(cfg)
    with pytest.raises(ConfigError) as info:
        build(cfg)
    assert str(info.value) == "callbacks.knn.every_n_epochs=0 must be >= 1; set callbacks.knn.every_n_epochs"


def test_a_missing_value_names_its_key(compose_train):
    message = _error(compose_train(["data=imagefolder"]))
    assert message.startswith("data.data_dir is not set") and "set data.data_dir=" in message
