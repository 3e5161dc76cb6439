"""moco-lightning: Momentum Contrast (v1, v2, v3) as PyTorch Lightning modules, datamodules and Hydra configs."""

from moco_lightning.backbones import BACKBONES, build_backbone
from moco_lightning.heads import Encoder, ProjectionHead, build_mlp
from moco_lightning.module import MoCo
from moco_lightning.queue import KeyQueue
from moco_lightning.v3 import MoCoV3

__all__ = ["BACKBONES", "Encoder", "KeyQueue", "MoCo", "MoCoV3", "ProjectionHead", "build_backbone", "build_mlp"]
__version__ = "0.1.0"
