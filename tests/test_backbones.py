import pytest
import torch
from torch import nn
from torchvision import models

from moco_lightning.backbones import BACKBONES, build_backbone


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
