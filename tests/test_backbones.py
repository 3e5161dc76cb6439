import pytest
import torch
from torch import nn
from torchvision import models

from moco_lightning.backbones import BACKBONES, build_backbone, check_backbone_name


@pytest.mark.parametrize("name,width", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_registry_resnets_drop_fc_and_report_width(name, width):
    net, dim = build_backbone(name)
    assert dim == width
    assert isinstance(net.fc, nn.Identity)
    reference = set(BACKBONES[name]().state_dict()) - {"fc.weight", "fc.bias"}
    assert set(net.state_dict()) == reference


def test_cifar_stem_is_3x3_stride1_without_maxpool():
    net, dim = build_backbone("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    out = net(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, dim)


def test_cifar_stem_conv_keeps_the_default_conv_init_as_the_official_demo():
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", cifar_stem=True)
    torch.manual_seed(0)
    models.resnet18()  # the demo: torchvision's ResNet (its init draws first) ...
    expected = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)  # ... then a fresh conv1
    torch.testing.assert_close(net.conv1.weight, expected.weight)


def test_torchvision_module_has_fc_removed_and_width_from_fc():
    resnet = models.resnet18(num_classes=10)
    net, dim = build_backbone(resnet)
    assert dim == 512 and isinstance(net.fc, nn.Identity)


def test_custom_module_width_found_by_dry_forward():
    custom = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    _, dim = build_backbone(custom)
    assert dim == 6
    _, dim = build_backbone(custom, feature_dim=6)
    assert dim == 6


def test_custom_module_with_spatial_output_is_a_clear_error():
    with pytest.raises(ValueError, match=r"must map images .* to features \(N, D\)"):
        build_backbone(nn.Conv2d(3, 4, 3))


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="backbone=resnet7 is not a known backbone; choose one of resnet18"):
        build_backbone("resnet7")


# ---------------------------------------------------------------------------------------------- timm backbones
#: Two small timm models: a ResNet with plain BatchNorm2d, and a MobileNetV3 whose width is not its num_features
#: (a 1x1 conv_head widens 288 to 1024 after the pooling).
TIMM_MODELS = [("resnet10t", 512), ("mobilenetv3_small_050", 1024)]


@pytest.mark.parametrize(("name", "width"), TIMM_MODELS)
def test_timm_models_build_by_name_without_classifier_with_their_width(name, width):
    import timm

    net, dim = build_backbone(f"timm:{name}")
    assert dim == width
    assert net.get_classifier().__class__ is nn.Identity
    reference = timm.create_model(name, pretrained=False)  # the same model with its classifier
    classifier = reference.pretrained_cfg["classifier"]
    assert set(net.state_dict()) == {k for k in reference.state_dict() if not k.startswith(f"{classifier}.")}
    assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, dim)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, dim)


def test_timm_names_are_checked_and_keep_their_stem():
    check_backbone_name("timm:resnet10t")
    with pytest.raises(ValueError, match=r"^backbone=timm:resnet10tt is not a timm model; did you mean timm:resnet10t"):
        check_backbone_name("timm:resnet10tt")
    with pytest.raises(ValueError, match=r"^cifar_stem=True only applies to torchvision ResNets, not to timm:"):
        build_backbone("timm:resnet10t", cifar_stem=True)
    with pytest.raises(ValueError, match="timm:<a timm model>"):
        check_backbone_name("resnet7")


@pytest.mark.parametrize(("model_class", "name"), [("MoCo", "resnet10t"), ("MoCoV3", "mobilenetv3_small_050")])
def test_moco_v2_and_v3_train_two_steps_with_a_timm_backbone(tmp_path, model_class, name):
    import lightning as L
    from torch.utils.data import DataLoader

    import moco_lightning
    from two_view_noise import TwoViewNoise

    options = dict(dim=8, queue_size=16, mlp=True, temperature=0.2, lr=0.01, bn="none") if model_class == "MoCo" \
        else dict(dim=8, mlp_dim=16, bn="none", optimizer="sgd", lr=0.01, scale_lr=False, warmup_epochs=0)
    model = getattr(moco_lightning, model_class)(backbone=f"timm:{name}", **options)
    before = {k: v.clone() for k, v in model.state_dict().items() if "backbone" in k}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, DataLoader(TwoViewNoise(32), batch_size=4, drop_last=True))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the backbone trained
    assert model.hparams.backbone == f"timm:{name}"


@pytest.fixture(scope="module")
def timm_checkpoint():
    """A (MoCo v2, timm resnet10t) checkpoint as moco-train writes it, weights moved off their initialisation."""
    from moco_lightning import MoCo

    torch.manual_seed(0)
    model = MoCo(backbone="timm:resnet10t", dim=8, queue_size=16, mlp=True, bn="none")
    with torch.no_grad():
        for p in model.encoder_q.backbone.parameters():
            p.add_(torch.randn_like(p))
    return model, {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}


def test_timm_backbone_reloads_for_knn_and_the_probes(timm_checkpoint):
    from torch.utils.data import DataLoader, TensorDataset

    from moco_lightning.eval import LinearProbe, knn_accuracy, load_backbone

    model, ckpt = timm_checkpoint
    backbone, dim, info = load_backbone(ckpt)
    assert info.backbone == "timm:resnet10t" and dim == 512
    for key, value in model.encoder_q.backbone.state_dict().items():
        assert torch.equal(backbone.state_dict()[key], value), key
    images = DataLoader(TensorDataset(torch.randn(8, 3, 16, 16), torch.arange(8) % 2), batch_size=4)
    assert 0.0 <= knn_accuracy(backbone, images, images, num_classes=2, k=3)["top1"] <= 1.0
    probe = LinearProbe(backbone, dim, num_classes=2)
    assert probe(torch.randn(2, 3, 16, 16)).shape == (2, 2)


def test_timm_export_loads_strictly_into_timm_and_torchvision_export_refuses(timm_checkpoint, tmp_path):
    import timm

    from moco_lightning.cli.export import main as export_main
    from moco_lightning.eval.checkpoint import CheckpointError
    from moco_lightning.eval.export import export_timm, export_torchvision

    model, ckpt = timm_checkpoint
    fresh = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    fresh.load_state_dict(torch.load(export_timm(ckpt, tmp_path / "r10t.pth"), weights_only=True), strict=True)
    for key, value in model.encoder_q.backbone.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with_classifier = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    result = with_classifier.load_state_dict(torch.load(tmp_path / "r10t.pth", weights_only=True), strict=False)
    assert set(result.missing_keys) == {"fc.weight", "fc.bias"} and not result.unexpected_keys
    with pytest.raises(CheckpointError, match=r"torchvision/detectron2 export .*\(export it with format timm\)"):
        export_torchvision(ckpt, tmp_path / "no.pth")
    torch.save(ckpt, tmp_path / "run.ckpt")
    export_main([str(tmp_path / "run.ckpt")])  # auto: the timm format for a timm backbone
    assert (tmp_path / "run_timm.pth").is_file() and not (tmp_path / "run_torchvision.pth").exists()
