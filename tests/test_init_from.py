"""``init_from``: both encoders start from a file's backbone weights, whatever wrote it, or one line says why not."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader
from torchvision import models

from moco_lightning import MoCo, MoCoV3
from moco_lightning.backbones import use_cifar_stem
from moco_lightning.init_weights import InitWeightsError, check_init_from
from two_view_noise import TwoViewNoise

#: the tiny modules of these tests: plain BN (no split groups), small heads and queue
V2 = dict(dim=8, queue_size=16, mlp=True, temperature=0.2, bn="none")
V3 = dict(dim=8, mlp_dim=16, bn="none", optimizer="sgd", lr=0.01, scale_lr=False, warmup_epochs=0)


def random_resnet18(cifar_stem: bool = False) -> dict[str, torch.Tensor]:
    """A torchvision resnet18 state dict (``fc`` included) with BN statistics away from their defaults."""
    net = models.resnet18()
    if cifar_stem:
        use_cifar_stem(net)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.uniform_(0.5, 1.5)
    return net.state_dict()


def assert_both_backbones_equal(backbone_q: torch.nn.Module, backbone_k: torch.nn.Module,
                                expected: dict[str, torch.Tensor]) -> None:
    for backbone in (backbone_q, backbone_k):
        state = backbone.state_dict()
        assert set(state) == set(expected)
        for key, value in expected.items():
            assert torch.equal(state[key], value), key


def backbone_part(state: dict[str, torch.Tensor], drop: str = "fc.") -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(drop)}


@pytest.fixture(scope="module")
def torchvision_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tv") / "resnet18.pth"
    torch.save(random_resnet18(), path)
    return path


def test_torchvision_state_dict_starts_both_encoders_and_leaves_the_head_random(torchvision_file, caplog):
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="moco_lightning.init_weights"):
        model = MoCo(backbone="resnet18", cifar_stem=False, init_from=str(torchvision_file), **V2)
    expected = backbone_part(torch.load(torchvision_file, weights_only=True))
    assert_both_backbones_equal(model.encoder_q.backbone, model.encoder_k.backbone, expected)
    torch.manual_seed(0)
    scratch = MoCo(backbone="resnet18", cifar_stem=False, **V2)  # the same draws: init_from does not touch the head
    for key, value in scratch.encoder_q.head.state_dict().items():
        assert torch.equal(model.encoder_q.head.state_dict()[key], value), key
    lines = [r.getMessage() for r in caplog.records if r.name == "moco_lightning.init_weights"]
    assert len(lines) == 1 and "torchvision ResNet state dict" in lines[0] and f"{len(expected)} tensors" in lines[0]
    assert model.hparams.init_from == str(torchvision_file)


def test_this_projects_checkpoints_start_the_other_version(tmp_path):
    torch.manual_seed(0)
    v2 = MoCo(backbone="resnet18", cifar_stem=True, **V2)
    torch.save({"state_dict": v2.state_dict(), "hyper_parameters": dict(v2.hparams)}, tmp_path / "v2.ckpt")
    v3 = MoCoV3(backbone="resnet18", cifar_stem=True, init_from=tmp_path / "v2.ckpt", **V3)  # a Path will do
    assert v3.hparams.init_from == str(tmp_path / "v2.ckpt")
    expected = v2.encoder_q.backbone.state_dict()
    assert_both_backbones_equal(v3.base_encoder.backbone, v3.momentum_encoder.backbone, expected)

    torch.save({"state_dict": v3.state_dict(), "hyper_parameters": dict(v3.hparams)}, tmp_path / "v3.ckpt")
    again = MoCo(backbone="resnet18", cifar_stem=True, init_from=str(tmp_path / "v3.ckpt"), **V2)
    assert_both_backbones_equal(again.encoder_q.backbone, again.encoder_k.backbone, expected)


def test_official_moco_v2_and_v3_checkpoints(tmp_path):
    backbone = backbone_part(random_resnet18(cifar_stem=True))
    v2 = {**{f"module.encoder_q.{k}": v for k, v in backbone.items()},
          **{f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in backbone.items()},
          "module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.encoder_q.fc.2.weight": torch.zeros(128, 512),
          "module.queue": torch.zeros(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": v2}, tmp_path / "moco_v2_200ep.pth.tar")
    model = MoCo(backbone="resnet18", cifar_stem=True, init_from=str(tmp_path / "moco_v2_200ep.pth.tar"), **V2)
    assert_both_backbones_equal(model.encoder_q.backbone, model.encoder_k.backbone, backbone)

    v3 = {**{f"module.base_encoder.{k}": v for k, v in backbone.items()},
          "module.base_encoder.fc.0.weight": torch.zeros(16, 512),
          **{f"module.momentum_encoder.{k}": torch.zeros_like(v) for k, v in backbone.items()},
          "module.predictor.0.weight": torch.zeros(16, 8)}
    torch.save({"epoch": 100, "arch": "resnet18", "state_dict": v3}, tmp_path / "r-18-100ep.pth.tar")
    model = MoCoV3(backbone="resnet18", cifar_stem=True, init_from=str(tmp_path / "r-18-100ep.pth.tar"), **V3)
    assert_both_backbones_equal(model.base_encoder.backbone, model.momentum_encoder.backbone, backbone)


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050"])
def test_timm_state_dict_drops_the_classifier(tmp_path, name):
    net = timm.create_model(name, pretrained=False, num_classes=7)
    classifier = net.pretrained_cfg["classifier"]
    torch.save(net.state_dict(), tmp_path / f"{name}.pth")
    model = MoCo(backbone=f"timm:{name}", init_from=str(tmp_path / f"{name}.pth"), **V2)
    expected = backbone_part(net.state_dict(), drop=f"{classifier}.")
    assert_both_backbones_equal(model.encoder_q.backbone, model.encoder_k.backbone, expected)


def test_a_deit_style_model_container_and_a_legacy_file_without_bn_counters(tmp_path):
    net = timm.create_model("test_vit", pretrained=False, num_classes=3)
    torch.save({"model": net.state_dict(), "epoch": 3}, tmp_path / "deit.pth")  # DeiT's / moco-export deit's layout
    model = MoCo(backbone="timm:test_vit", init_from=str(tmp_path / "deit.pth"), **V2)
    assert_both_backbones_equal(model.encoder_q.backbone, model.encoder_k.backbone, backbone_part(
        net.state_dict(), drop="head."))

    state = {k: v for k, v in random_resnet18().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # not memory-mappable
    model = MoCo(backbone="resnet18", init_from=str(tmp_path / "old.pth"), **V2)
    assert torch.equal(model.encoder_k.backbone.conv1.weight, state["conv1.weight"])


@pytest.mark.parametrize(("change", "expected"), [
    ("missing", r"does not fit the backbone: missing from the file: 1 \(layer4\.1\.bn2\.weight\); pass weights"),
    ("extra", r"unexpected in the file: 2 \(layer5\.weight, layer5\.bias\)"),
    ("shape", r"1 tensors of another shape \(file vs backbone: layer4\.1\.bn2\.weight \(3,\) vs \(512,\)\)"),
])
def test_keys_that_do_not_fit_are_one_line_naming_them(tmp_path, change, expected):
    state = random_resnet18()
    if change == "missing":
        del state["layer4.1.bn2.weight"]
    elif change == "extra":
        state.update({"layer5.weight": torch.zeros(1), "layer5.bias": torch.zeros(1)})
    else:
        state["layer4.1.bn2.weight"] = torch.zeros(3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    for build in (lambda: MoCo(backbone="resnet18", init_from=str(path), **V2),
                  lambda: check_init_from(str(path), backbone="resnet18")):  # the CLI's check, on names and shapes
        with pytest.raises(InitWeightsError, match=expected) as info:
            build()
        assert "\n" not in str(info.value) and str(info.value).startswith(f"init_from={path} (torchvision ResNet")


def test_many_missing_keys_are_counted_not_listed(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "stem.pth")
    # 99: the BatchNorm counters (num_batches_tracked) may be missing, the backbone keeps its own
    with pytest.raises(InitWeightsError, match=r"missing from the file: 99 \(bn1\.weight, .* and 94 more\)"):
        check_init_from(str(tmp_path / "stem.pth"), backbone="resnet18")


def test_an_imagenet_stem_for_the_cifar_stem_names_the_setting(torchvision_file, tmp_path):
    with pytest.raises(InitWeightsError, match=r"^cifar_stem=True builds conv1 \(64, 3, 3, 3\) but init_from=.* has "
                       r"conv1 \(64, 3, 7, 7\), the 7x7 ImageNet stem; set cifar_stem=false"):
        MoCo(backbone="resnet18", cifar_stem=True, init_from=str(torchvision_file), **V2)
    torch.save(random_resnet18(cifar_stem=True), tmp_path / "cifar.pth")
    with pytest.raises(InitWeightsError, match=r"^cifar_stem=False builds conv1 \(64, 3, 7, 7\) .* cifar_stem=true"):
        check_init_from(str(tmp_path / "cifar.pth"), backbone="resnet18", cifar_stem=False)


def test_files_that_hold_no_weights(tmp_path):
    with pytest.raises(InitWeightsError, match=r"does not exist; pass a weights file .* or init_from=null"):
        check_init_from(str(tmp_path / "nowhere.pth"))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(InitWeightsError, match=r"holds no state dict \(a list\)"):
        check_init_from(str(tmp_path / "list.pth"))
    torch.save({"state_dict": random_resnet18(), "opt": Path("x")}, tmp_path / "pickled.pth")
    with pytest.raises(InitWeightsError, match=r"holds pickled Python objects \(such as pathlib\.\w*Path\), which"):
        check_init_from(str(tmp_path / "pickled.pth"))
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(InitWeightsError, match=r"notes\.txt is not a PyTorch weights file that torch\.load"):
        check_init_from(str(tmp_path / "notes.txt"))


def test_a_resumed_run_takes_its_checkpoints_weights_and_load_from_checkpoint_skips_the_file(torchvision_file,
                                                                                             tmp_path):
    trained = MoCo(backbone="resnet18", cifar_stem=False, **V2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    data = DataLoader(TwoViewNoise(32), batch_size=4, drop_last=True)
    trainer.fit(trained, data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")

    resumed = MoCo(backbone="resnet18", cifar_stem=False, init_from=str(torchvision_file), **V2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(resumed, data, ckpt_path=tmp_path / "run.ckpt")  # at max_steps already: restores, trains nothing
    for key, value in trained.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key

    trainer.save_checkpoint(tmp_path / "resumed.ckpt")  # its hyper-parameters name the init_from file
    restored = MoCo.load_from_checkpoint(tmp_path / "resumed.ckpt", init_from=None)  # the file need not exist
    assert torch.equal(restored.encoder_q.backbone.conv1.weight, trained.encoder_q.backbone.conv1.weight)
