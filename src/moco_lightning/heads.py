"""Projection heads, from backbone features to the contrastive embedding space, and the encoder they complete.

* :class:`ProjectionHead`: the MoCo v1 (linear) and v2 (2-layer MLP, no BN) heads.
* :func:`build_mlp`: the MoCo v3 projector and predictor (bias-free linears, BN + ReLU, optional affine-free last
  BN), as the official ``_build_mlp``.
* :class:`Encoder`: a backbone followed by a head.
"""

from __future__ import annotations

import torch
from torch import nn


class Encoder(nn.Module):
    """A backbone followed by a projection head: images to (unnormalised) embeddings."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed images ``(N, 3, H, W)`` into ``(N, dim)``."""
        return self.head(self.backbone(x))


class ProjectionHead(nn.Sequential):
    """The MoCo projection head.

    * ``mlp=False`` (MoCo v1): one ``Linear(in_dim, out_dim)``, as the official code's replaced ``fc``.
    * ``mlp=True`` (MoCo v2, Chen et al. 2020, Sec. 2): ``Linear(in_dim, hidden) -> ReLU -> Linear(hidden,
      out_dim)``, no batch norm, hidden width ``in_dim`` unless ``hidden_dim`` is given.

    ``in_dim`` is the backbone's width D, ``out_dim`` the embedding's (the paper's ``dim``, 128 in MoCo).
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None, mlp: bool = False) -> None:
        if mlp:
            hidden = in_dim if hidden_dim is None else hidden_dim
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
        else:
            if hidden_dim is not None:
                raise ValueError("hidden_dim only applies to the MLP head; set mlp=True or drop hidden_dim")
            layers = [nn.Linear(in_dim, out_dim)]
        super().__init__(*layers)


def build_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """The MLP of MoCo v3's projector and predictor (official ``MoCo._build_mlp``; Chen, Xie, He 2021, Sec. 4).

    ``num_layers`` linear layers without bias, ``input_dim -> mlp_dim -> ... -> output_dim``; every hidden layer
    is followed by ``BatchNorm1d`` and ReLU; with ``last_bn`` the output goes through a ``BatchNorm1d`` without
    affine parameters (SimCLR's design, its γ and β removed).

    The official sizes (hidden ``mlp_dim`` 4096, output ``dim`` 256): ResNet-50 projector ``build_mlp(2, 2048,
    4096, 256)``, predictor ``build_mlp(2, 256, 4096, 256, last_bn=False)``; ViT projector ``build_mlp(3, D, 4096,
    256)``, predictor ``build_mlp(2, 256, 4096, 256)``.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got num_layers={num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = input_dim if i == 0 else mlp_dim
        d_out = output_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)
