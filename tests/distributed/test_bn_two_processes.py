"""BN modes on two CPU processes (gloo): the keys each rank gets equal a reference computed by hand from the
gathered batch and the permutations, and every sample's key is its own."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from moco_lightning.bn import AllReduceBatchNorm2d, SplitBatchNorm2d, encode_shuffled

N = 8  # per rank
SHUFFLE_SEED, SPLIT_SEED = 11, 23


def _batches() -> torch.Tensor:
    """The key images of both ranks, (2, N, 2, 3, 3), float64."""
    return torch.randn(2, N, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _encoder(bn: type[nn.BatchNorm2d], **kwargs) -> nn.Module:
    torch.manual_seed(5)  # the same weights on every rank
    net = nn.Sequential(nn.Conv2d(2, 4, 1), bn(4, **kwargs), nn.Flatten()).double()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


def _worker(rank: int, port: int, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = _batches()[rank]
        result = {}
        # shuffle: the permutation is rank 0's draw (other ranks draw something else and must not use it)
        plain, split = _encoder(nn.BatchNorm2d), _encoder(SplitBatchNorm2d, num_splits=2)
        torch.manual_seed(SHUFFLE_SEED if rank == 0 else 999)
        with torch.no_grad():
            result["shuffle"] = encode_shuffled(plain, x, "shuffle")
            result["shuffle_identity"] = encode_shuffled(nn.Flatten(), x, "shuffle")
        # split: each rank shuffles its own batch on its own device
        torch.manual_seed(SPLIT_SEED + rank)
        with torch.no_grad():
            result["split"] = encode_shuffled(split, x, "split")
            result["split_identity"] = encode_shuffled(nn.Flatten(), x, "split")
        # sync: statistics of the global batch, gradients through the all-reduce
        net = _encoder(AllReduceBatchNorm2d)
        xs = x.clone().requires_grad_(True)
        y = net(xs)  # encode_shuffled(net, x, "sync") is net(x) under no_grad: keys need no gradient
        (y * (rank + 1)).pow(2).sum().backward()
        result["sync"] = y.detach()
        result["sync_grad_x"], result["sync_grad_w"] = xs.grad, net[1].weight.grad
        result["sync_running"] = (net[1].running_mean.clone(), net[1].running_var.clone())
        out[rank] = result
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_keys_of_every_bn_mode_match_a_reference_built_from_the_gathered_batch():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    batches = _batches()
    x_all = batches.reshape(2 * N, 2, 3, 3)

    # shuffle BN: rank r encodes slice r of the permuted global batch with its own BN statistics
    torch.manual_seed(SHUFFLE_SEED)
    perm = torch.randperm(2 * N)
    encoded = torch.empty(2 * N, 36, dtype=torch.float64)
    for r in range(2):
        rows = perm[r * N : (r + 1) * N]
        encoded[rows] = _encoder(nn.BatchNorm2d)(x_all[rows]).detach()
    for r in range(2):
        torch.testing.assert_close(out[r]["shuffle"], encoded[r * N : (r + 1) * N])
        torch.testing.assert_close(out[r]["shuffle_identity"], batches[r].flatten(1))  # every key is its own

    # split BN: each rank's batch shuffled on the device, 2 groups of that order, un-shuffled
    for r in range(2):
        split = _encoder(SplitBatchNorm2d, num_splits=2)
        torch.manual_seed(SPLIT_SEED + r)
        local = torch.randperm(N)
        expected = split(batches[r][local]).detach()[torch.argsort(local)]
        torch.testing.assert_close(out[r]["split"], expected)
        torch.testing.assert_close(out[r]["split_identity"], batches[r].flatten(1))

    # sync BN: the statistics of all 2N images, as one BatchNorm2d over the global batch
    reference = _encoder(nn.BatchNorm2d)
    xs = x_all.clone().requires_grad_(True)
    y = reference(xs)
    weights = torch.cat([torch.full((N, 1), 1.0), torch.full((N, 1), 2.0)]).double()
    (y * weights).pow(2).sum().backward()
    for r in range(2):
        torch.testing.assert_close(out[r]["sync"], y.detach()[r * N : (r + 1) * N])
        torch.testing.assert_close(out[r]["sync_grad_x"], xs.grad[r * N : (r + 1) * N])
        mean, var = out[r]["sync_running"]
        torch.testing.assert_close(mean, reference[1].running_mean)
        torch.testing.assert_close(var, reference[1].running_var)
    # the weight gradients of the ranks sum to the global batch's (DDP then averages them)
    torch.testing.assert_close(out[0]["sync_grad_w"] + out[1]["sync_grad_w"], reference[1].weight.grad)
