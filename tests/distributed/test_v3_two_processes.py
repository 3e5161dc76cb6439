"""MoCo v3 on two CPU processes (gloo): the loss over the keys of both ranks, and a two-process fit under DDP."""

import os
import socket

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, Dataset

from moco_lightning import MoCoV3
from moco_lightning.losses import moco_v3_loss
from test_losses import reference_moco_v3_loss  # tests/ is on the path (pytest's rootdir-based import)

N, C, T = 3, 5, 0.2  # queries per rank, width, temperature


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of both ranks, rank 0's rows first."""
    g = torch.Generator().manual_seed(7)
    return torch.randn(2 * N, C, generator=g, dtype=torch.float64), torch.randn(2 * N, C, generator=g,
                                                                                 dtype=torch.float64)


class Views(Dataset):
    def __init__(self, n: int = 16) -> None:
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i], self.x[i].flip(-1)), 0


def worker(rank: int, world: int, port: int, results) -> None:
    # the processes are ours: Lightning finds the environment (LOCAL_RANK set) and the process group up
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        q_all, k_all = global_batch()
        loss = moco_v3_loss(q_all[N * rank:N * (rank + 1)], k_all[N * rank:N * (rank + 1)], T)

        L.seed_everything(0, verbose=False)
        model = MoCoV3("resnet18", cifar_stem=True, dim=8, mlp_dim=16, temperature=T, momentum=0.5,
                       optimizer="lars", lr=0.6, warmup_epochs=0)
        trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_steps=2, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(model, DataLoader(Views(), batch_size=4, shuffle=True, drop_last=True))
        results[rank] = {
            "loss": loss.item(),
            "steps": trainer.global_step,
            "base": model.base_encoder.head[0].weight.detach().clone(),
            "momentum": model.momentum_encoder.head[0].weight.detach().clone(),
            "bn": [type(m).__name__ for m in (model.base_encoder.backbone.bn1, model.predictor[1])],
            "running_mean": model.base_encoder.backbone.bn1.running_mean.clone(),
        }
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    results = mp.Manager().dict()
    mp.start_processes(worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
    return results[0], results[1]


@pytest.mark.timeout(240)
def test_loss_contrasts_with_the_keys_of_both_ranks_and_labels_carry_the_rank_offset(two_ranks):
    q_all, k_all = global_batch()
    for rank, result in enumerate(two_ranks):
        expected = reference_moco_v3_loss(q_all[N * rank:N * (rank + 1)], k_all, T, offset=N * rank)
        assert abs(result["loss"] - expected) < 1e-9, rank


@pytest.mark.timeout(240)
def test_two_process_fit_keeps_encoders_in_sync(two_ranks):
    r0, r1 = two_ranks
    assert r0["steps"] == r1["steps"] == 2
    assert torch.equal(r0["base"], r1["base"]) and torch.equal(r0["momentum"], r1["momentum"])
    assert not torch.equal(r0["base"], r0["momentum"])


@pytest.mark.timeout(240)
def test_cpu_processes_normalise_over_the_global_batch(two_ranks):
    # PyTorch's SyncBatchNorm runs on accelerators only: CPU processes get the all-reduce BN of moco_lightning.bn,
    # so the BN statistics, computed over both ranks' images, are the same on both ranks
    r0, r1 = two_ranks
    assert r0["bn"] == r1["bn"] == ["AllReduceBatchNorm2d", "AllReduceBatchNorm1d"]
    assert torch.equal(r0["running_mean"], r1["running_mean"])
