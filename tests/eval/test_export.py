import pickle
import re

import pytest
import torch
from eval_helpers import make_blobs, save_checkpoint, tiny_moco
from torchvision import models

from moco_lightning.eval.checkpoint import CheckpointError
from moco_lightning.eval.export import (
    detectron2_checkpoint,
    detectron2_key,
    export_detectron2,
    export_torchvision,
    torchvision_model,
)


def _expected_detectron2_key(key: str) -> str:
    """The official convert-pretrain-to-detectron2.py rules, spelled out independently of the implementation."""
    parts = key.split(".")
    if parts[0] in ("conv1", "bn1"):
        return "stem.conv1." + ("norm." if parts[0] == "bn1" else "") + ".".join(parts[1:])
    stage = {"layer1": "res2", "layer2": "res3", "layer3": "res4", "layer4": "res5"}[parts[0]]
    block, layer, rest = parts[1], parts[2], parts[3:]
    if layer == "downsample":
        layer = "shortcut" if rest[0] == "0" else "shortcut.norm"
        rest = rest[1:]
    elif layer.startswith("bn"):
        layer = f"conv{layer[2:]}.norm"
    return ".".join([stage, block, layer, *rest])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_detectron2_keys_follow_the_official_renaming_for_every_layer(arch):
    state = getattr(models, arch)().state_dict()
    converted = detectron2_checkpoint(state)
    assert converted["__author__"] == "MOCO" and converted["matching_heuristics"] is True
    expected = {
        _expected_detectron2_key(k): v
        for k, v in state.items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    assert set(converted["model"]) == set(expected)
    for key, value in converted["model"].items():
        assert (value == expected[key].numpy()).all(), key
    pattern = r"^(stem\.conv1(\.norm)?|res[2-5]\.\d+\.(conv[1-3](\.norm)?|shortcut(\.norm)?))\.[a-z_]+$"
    assert all(re.match(pattern, k) for k in converted["model"]), sorted(converted["model"])[:5]


def test_detectron2_key_examples():
    assert detectron2_key("conv1.weight") == "stem.conv1.weight"
    assert detectron2_key("bn1.running_var") == "stem.conv1.norm.running_var"
    assert detectron2_key("layer1.0.conv3.weight") == "res2.0.conv3.weight"
    assert detectron2_key("layer4.2.bn3.bias") == "res5.2.conv3.norm.bias"
    assert detectron2_key("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert detectron2_key("layer3.0.downsample.1.running_mean") == "res4.0.shortcut.norm.running_mean"


def test_torchvision_export_loads_with_only_fc_missing_and_gives_the_same_features(tmp_path):
    model = tiny_moco(cifar_stem=False)
    model.train()
    with torch.no_grad():
        model.embed(torch.randn(8, 3, 32, 32))  # move the BN statistics off their initial values
    model.eval()
    path = export_torchvision(save_checkpoint(model, tmp_path / "moco.ckpt"), tmp_path / "r18.pth")
    net = models.resnet18()
    result = net.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    net.fc = torch.nn.Identity()
    net.eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(net(x), model.embed(x))


def test_cifar_stem_export_loads_into_a_cifar_stem_torchvision_model(moco_checkpoint, tmp_path):
    model, ckpt_path = moco_checkpoint
    net = torchvision_model("resnet18", cifar_stem=True)
    result = net.load_state_dict(torch.load(export_torchvision(ckpt_path, tmp_path / "r18.pth")), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    net.fc = torch.nn.Identity()
    x = make_blobs(3, seed=7)[0]
    torch.testing.assert_close(net.eval()(x), model.embed(x))


def test_detectron2_export_writes_the_pickle_of_the_trained_weights(tmp_path):
    model = tiny_moco(cifar_stem=False)
    path = export_detectron2(save_checkpoint(model, tmp_path / "moco.ckpt"), tmp_path / "d2.pkl")
    with path.open("rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    weights = obj["model"]
    assert (
        weights["res5.1.conv2.norm.running_var"] == model.encoder_q.backbone.layer4[1].bn2.running_var.numpy()
    ).all()
    assert (weights["stem.conv1.weight"] == model.encoder_q.backbone.conv1.weight.detach().numpy()).all()


def test_detectron2_export_of_a_cifar_stem_backbone_is_a_clear_error(moco_checkpoint, tmp_path):
    _, path = moco_checkpoint
    with pytest.raises(CheckpointError, match="cifar_stem"):
        export_detectron2(path, tmp_path / "d2.pkl")
    assert not (tmp_path / "d2.pkl").exists()


def test_export_of_a_non_moco_file_is_a_clear_error(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(models.resnet18().state_dict(), path)
    with pytest.raises(CheckpointError, match="not a MoCo checkpoint"):
        export_torchvision(path, tmp_path / "out.pth")
