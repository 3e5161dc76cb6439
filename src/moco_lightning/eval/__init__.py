"""Evaluation of pretrained encoders: kNN monitor and metric, online and offline linear probes, fine-tuning, export."""

from moco_lightning.eval.checkpoint import (
    BackboneCheckpoint,
    CheckpointError,
    EmbeddingEncoder,
    UnsafeCheckpointError,
    load_backbone,
    load_query_encoder,
    read_backbone_checkpoint,
)
from moco_lightning.eval.export import (
    deit_state_dict,
    detectron2_checkpoint,
    detectron2_key,
    export_deit,
    export_detectron2,
    export_torchvision,
    torchvision_model,
    torchvision_state_dict,
)
from moco_lightning.eval.features import extract_features
from moco_lightning.eval.finetune import FineTuner, export_classifier, finetune
from moco_lightning.eval.knn import KNNMonitor, knn_accuracy, weighted_knn_predict
from moco_lightning.eval.linear import LinearProbe, linear_eval
from moco_lightning.eval.linear_features import feature_probe, probe_features
from moco_lightning.eval.online_linear import OnlineLinearProbe

__all__ = [
    "BackboneCheckpoint",
    "CheckpointError",
    "EmbeddingEncoder",
    "FineTuner",
    "KNNMonitor",
    "LinearProbe",
    "OnlineLinearProbe",
    "UnsafeCheckpointError",
    "deit_state_dict",
    "detectron2_checkpoint",
    "detectron2_key",
    "export_classifier",
    "export_deit",
    "export_detectron2",
    "export_torchvision",
    "extract_features",
    "feature_probe",
    "finetune",
    "knn_accuracy",
    "linear_eval",
    "load_backbone",
    "load_query_encoder",
    "probe_features",
    "read_backbone_checkpoint",
    "torchvision_model",
    "torchvision_state_dict",
    "weighted_knn_predict",
]
