"""The single-process behaviour of the distributed helpers: SyncBatchNorm conversion."""

import pytest
import torch
from torch import nn

from moco_lightning.distributed import convert_sync_batchnorm


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(8), nn.BatchNorm1d(8))


def batch_norms(module: nn.Module) -> list[str]:
    return [type(m).__name__ for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def test_batch_norm_becomes_sync_batch_norm_under_several_gpu_processes():
    module = net()
    weight = module[1].weight
    assert convert_sync_batchnorm(module, processes=2, device="cuda:0")
    assert batch_norms(module) == ["SyncBatchNorm", "SyncBatchNorm"]
    assert module[1].weight is weight  # the same parameters, now synchronised


def test_one_process_keeps_plain_batch_norm():
    module = net()
    assert not convert_sync_batchnorm(module, processes=1, device="cuda:0")
    assert batch_norms(module) == ["BatchNorm2d", "BatchNorm1d"]


def test_cpu_processes_keep_plain_batch_norm_and_say_why():
    module = net()
    with pytest.warns(UserWarning, match="SyncBatchNorm needs GPUs"):
        assert not convert_sync_batchnorm(module, processes=2, device=torch.device("cpu"))
    assert batch_norms(module) == ["BatchNorm2d", "BatchNorm1d"]
