"""Projection heads that map backbone features to the contrastive embedding space."""

from __future__ import annotations

from torch import nn


class ProjectionHead(nn.Sequential):
    """The MoCo projection head.

    * ``mlp=False`` (MoCo v1): one ``Linear(in_dim, out_dim)``, as the official code's replaced ``fc``.
    * ``mlp=True`` (MoCo v2, Chen et al. 2020, Sec. 2): ``Linear(in_dim, hidden) -> ReLU -> Linear(hidden,
      out_dim)``, no batch norm, hidden width ``in_dim`` unless ``hidden_dim`` is given.

    Args:
        in_dim: width D of the backbone features.
        out_dim: width of the embedding (``dim`` in the paper, 128 by default in MoCo).
        hidden_dim: hidden width of the MLP; ``None`` means ``in_dim``.
        mlp: two layers with a ReLU instead of one linear layer.

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
        self.in_dim, self.out_dim = in_dim, out_dim
