"""moco-lightning: Momentum Contrast as a PyTorch Lightning module, datamodules and Hydra configs."""

from moco_lightning.backbones import BACKBONES, build_backbone
from moco_lightning.heads import ProjectionHead
from moco_lightning.module import Encoder, MoCo
from moco_lightning.queue import KeyQueue

__all__ = ["BACKBONES", "Encoder", "KeyQueue", "MoCo", "ProjectionHead", "build_backbone"]
__version__ = "0.1.0"
