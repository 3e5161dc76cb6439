"""eval/features.py: embedding a dataset with a frozen encoder (the distributed case: test_knn_distributed.py)."""

import torch
from eval_helpers import make_blobs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from moco_lightning.eval.features import eval_mode, extract_features, has_labels


def test_extract_features_returns_dataset_order_and_float32():
    x, y = make_blobs(10, seed=0)
    feats, labels = extract_features(lambda t: t.flatten(1).half(), DataLoader(TensorDataset(x, y), batch_size=3))
    assert feats.dtype == torch.float32 and feats.shape == (10, x[0].numel())
    torch.testing.assert_close(feats, x.flatten(1).half().float())
    assert torch.equal(labels, y)


def test_eval_mode_restores_each_submodules_own_mode():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout())
    net.train()
    net[1].eval()  # a frozen BN inside a training model must stay frozen afterwards
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert [m.training for m in net.modules()] == [True, True, False, True]


def test_a_datamodule_without_the_attribute_counts_as_labelled():
    assert has_labels(object()) and has_labels(None)
    assert not has_labels(type("Unlabelled", (), {"has_labels": False})())
