"""``python train.py model.init_from=<file>`` and ``backbone=timm backbone.name=<model>``, run in-process at 8 px."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torchvision import models

from moco_lightning.backbones import use_cifar_stem
from moco_lightning.cli import CONFIG_PATH
from moco_lightning.cli.config_checks import ConfigError, check_command_line
from moco_lightning.cli.train import train

from .conftest import TINY

#: TINY without the evaluations a run of two steps does not need here (last.ckpt stays)
QUICK = [*(arg for arg in TINY if not arg.startswith("callbacks.embedding_map")), "knn_report=false",
         "~callbacks.knn", "~callbacks.diagnostics", "~callbacks.embedding_map", "~callbacks.model_checkpoint"]


def resnet18_file(path: Path, cifar_stem: bool, extra: bool = False) -> Path:
    """A torchvision resnet18 state dict, ``fc`` included; with ``extra`` a key no ResNet has."""
    net = models.resnet18()
    if cifar_stem:
        use_cifar_stem(net)
    state = net.state_dict()
    if extra:
        state["layer5.weight"] = torch.zeros(1)
    torch.save(state, path)
    return path


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


def test_training_starts_from_a_torchvision_file(compose_train, tmp_path, caplog):
    weights = resnet18_file(tmp_path / "r18.pth", cifar_stem=False)  # the digits recipe's ImageNet stem
    with caplog.at_level(logging.INFO, logger="moco_lightning.init_weights"):
        train(compose_train([*QUICK, f"model.init_from={weights}"]))
    lines = [r.getMessage() for r in caplog.records if r.name == "moco_lightning.init_weights"]
    assert len(lines) == 1 and "torchvision ResNet state dict" in lines[0] and "120 tensors loaded" in lines[0]  # no fc
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and last["hyper_parameters"]["init_from"] == str(weights)


@pytest.mark.parametrize(("case", "expected"), [
    ("extra", "error: model.init_from={file} (torchvision ResNet state dict) does not fit the backbone: unexpected "
              "in the file: 1 (layer5.weight)"),
    ("stem", "error: model.cifar_stem=true builds conv1 (64, 3, 3, 3) but model.init_from={file} (torchvision "
             "ResNet state dict) has conv1 (64, 3, 7, 7), the 7x7 ImageNet stem; set model.cifar_stem=false"),
    ("missing", "error: model.init_from={file} does not exist; pass a weights file"),
])
def test_a_file_that_does_not_fit_is_one_line_with_status_2(compose_train, tmp_path, capsys, case, expected):
    file = tmp_path / f"{case}.pth"
    if case != "missing":
        resnet18_file(file, cifar_stem=False, extra=case == "extra")
    stem = ["model.cifar_stem=true"] if case == "stem" else []
    with pytest.raises(SystemExit) as info:
        train(compose_train([*QUICK, f"model.init_from={file}", *stem]))
    assert info.value.code == 2
    assert error_line(capsys).startswith(expected.format(file=file))
    assert not (tmp_path / "checkpoints").exists()  # stopped before anything was built


def test_a_timm_backbone_by_name_trains_and_exports(compose_train, tmp_path, capsys):
    from moco_lightning.cli.export import main as export_main

    check_command_line(["backbone=timm", "backbone.name=resnet10t"], CONFIG_PATH)
    with pytest.raises(ConfigError, match=r"backbone\.nme is not a setting of this config; did you mean backbone\."):
        check_command_line(["backbone=timm", "backbone.nme=resnet10t"], CONFIG_PATH)
    cfg = compose_train([*QUICK, "backbone=timm", "backbone.name=resnet10t"])
    assert cfg.model.backbone == "timm:resnet10t" and cfg.model.cifar_stem is False
    train(cfg)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["hyper_parameters"]["backbone"] == "timm:resnet10t"
    export_main([str(last)])
    assert (tmp_path / "checkpoints" / "last_timm.pth").is_file()


def test_an_unknown_timm_model_is_one_line_with_status_2(compose_train, capsys):
    with pytest.raises(SystemExit) as info:
        train(compose_train([*QUICK, "backbone=timm", "backbone.name=resnet10tt"]))
    assert info.value.code == 2
    assert error_line(capsys).startswith("error: model.backbone=timm:resnet10tt is not a timm model; did you mean "
                                         "timm:resnet10t")
