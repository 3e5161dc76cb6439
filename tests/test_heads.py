import pytest
import torch
from torch import nn

from moco_lightning.heads import Encoder, ProjectionHead, build_mlp


def test_linear_head_is_one_layer():
    head = ProjectionHead(512, 128)
    assert len(head) == 1 and isinstance(head[0], nn.Linear)
    assert (head[0].in_features, head[0].out_features) == (512, 128)


def test_mlp_head_is_linear_relu_linear_with_hidden_width_d():
    head = ProjectionHead(2048, 128, mlp=True)
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (2048, 2048, 128)


def test_mlp_hidden_width_configurable():
    head = ProjectionHead(512, 64, hidden_dim=256, mlp=True)
    assert head[0].out_features == 256 and head[2].in_features == 256


def test_hidden_width_without_mlp_is_an_error():
    with pytest.raises(ValueError, match="set mlp=True"):
        ProjectionHead(512, 128, hidden_dim=256)


def test_v3_mlp_has_bias_free_linears_bn_relu_and_a_non_affine_last_bn():
    mlp = build_mlp(3, 32, 64, 16)
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear, nn.BatchNorm1d]
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]
    assert all(m.bias is None for m in linears)
    hidden_bn, last_bn = mlp[1], mlp[-1]
    assert hidden_bn.affine and not last_bn.affine and last_bn.num_features == 16
    assert mlp.train()(torch.randn(5, 32)).shape == (5, 16)


def test_v3_mlp_without_last_bn_ends_in_a_linear():
    mlp = build_mlp(2, 256, 4096, 256, last_bn=False)  # the official ResNet predictor
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (mlp[0].in_features, mlp[0].out_features, mlp[3].out_features) == (256, 4096, 256)


def test_encoder_is_backbone_then_head():
    encoder = Encoder(nn.Flatten(), nn.Linear(12, 3))
    x = torch.randn(2, 3, 2, 2)
    torch.testing.assert_close(encoder(x), encoder.head(x.flatten(1)))
