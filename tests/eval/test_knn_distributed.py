"""The kNN feature extraction under torch.distributed: 2 CPU processes (gloo), a dataset that needs padding."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from moco_lightning.eval.knn import extract_features, knn_accuracy

N = 11  # odd: the DistributedSampler pads one duplicate


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, generator=g), torch.arange(N) % 3


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, y = _data()
        seen = []

        def embed(batch):
            seen.append(len(batch))
            return batch * 2

        loader = DataLoader(TensorDataset(x, y), batch_size=4)
        feats, labels = extract_features(embed, loader)
        acc = knn_accuracy(lambda b: b, loader, loader, k=3)
        out[rank] = (feats, labels, sum(seen), acc)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_each_process_embeds_a_shard_and_gets_the_whole_set_back_in_order():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    x, y = _data()
    single = knn_accuracy(
        lambda b: b, DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x, y)), k=3
    )
    for rank in (0, 1):
        feats, labels, embedded, acc = out[rank]
        torch.testing.assert_close(feats, x * 2)  # dataset order, padding duplicate dropped
        assert torch.equal(labels, y)
        assert embedded == 6  # its own shard only: ceil(11 / 2) with the pad
        assert acc == single
