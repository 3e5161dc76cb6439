import pytest
from torch import nn

from moco_lightning.heads import ProjectionHead


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
