"""kNN under torch.distributed: 2 CPU processes (gloo), a dataset that needs padding, a sharded memory bank."""

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from moco_lightning.eval.features import extract_features
from moco_lightning.eval.knn import knn_accuracy, weighted_knn_predict

N = 11  # odd: the DistributedSampler pads one duplicate


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, generator=g), torch.arange(N) % 3


def _bank():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 4, generator=g), torch.randn(40, 4, generator=g), torch.randint(0, 5, (40,), generator=g)


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
        shard, shard_labels = extract_features(lambda b: b, loader, gather=False)
        acc = knn_accuracy(lambda b: b, loader, loader, k=3)
        queries, bank, bank_labels = _bank()
        part = slice(0, 25) if rank == 0 else slice(25, 40)  # unequal parts of one bank
        scores = weighted_knn_predict(queries, bank[part], bank_labels[part], 5, k=10, chunk_size=4)
        out[rank] = (feats, labels, sum(seen), acc, shard, shard_labels, scores)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_each_process_embeds_a_shard_and_a_sharded_bank_gives_the_single_process_result():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    x, y = _data()
    single = knn_accuracy(
        lambda b: b, DataLoader(TensorDataset(x, y), batch_size=4), DataLoader(TensorDataset(x, y)), k=3
    )
    queries, bank, bank_labels = _bank()
    whole_bank = weighted_knn_predict(queries, bank, bank_labels, 5, k=10)
    for rank in (0, 1):
        feats, labels, embedded, acc, shard, shard_labels, scores = out[rank]
        torch.testing.assert_close(feats, x * 2)  # dataset order, padding duplicate dropped
        assert torch.equal(labels, y)
        assert embedded == 6  # its own shard only: ceil(11 / 2) with the pad
        assert acc == single
        # the bank a process keeps: its samples rank, rank + 2, ... without the padding duplicate
        assert torch.equal(shard, x[rank::2]) and torch.equal(shard_labels, y[rank::2])
        # a sharded bank gives the scores of the whole bank, on every process
        torch.testing.assert_close(scores, whole_bank, rtol=1e-5, atol=1e-6)
