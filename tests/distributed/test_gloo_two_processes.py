"""Two CPU processes joined by a gloo process group: what MoCo shares across ranks."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moco_lightning.distributed import shuffle_batch, unshuffle_batch
from moco_lightning.queue import KeyQueue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(123)  # same initial queue on every rank, as a seeded run has
        queue = KeyQueue(8, 2)
        keys = torch.full((2, 2), float(rank + 1))
        queue.enqueue(keys)

        x = torch.arange(4, dtype=torch.float32).unsqueeze(1) + 10 * rank
        torch.manual_seed(rank)  # different generators: the permutation must still come from rank 0
        shuffled, idx_unshuffle = shuffle_batch(x)
        results[rank] = {
            "queue": queue.queue.clone(),
            "ptr": int(queue.ptr),
            "shuffled": shuffled.clone(),
            "roundtrip": unshuffle_batch(shuffled, idx_unshuffle).clone(),
            "x": x,
        }
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_queue_gathers_keys_from_all_ranks_and_shuffle_bn_round_trips():
    manager = mp.Manager()
    results = manager.dict()
    mp.start_processes(worker, args=(2, free_port(), results), nprocs=2, join=True, start_method="spawn")
    r0, r1 = results[0], results[1]
    assert torch.equal(r0["queue"], r1["queue"]), "every rank must hold the same queue"
    assert torch.equal(r0["queue"][:2], torch.full((2, 2), 1.0))
    assert torch.equal(r0["queue"][2:4], torch.full((2, 2), 2.0))
    assert r0["ptr"] == r1["ptr"] == 4
    for r in (r0, r1):
        assert torch.equal(r["roundtrip"], r["x"])
    # one permutation, broadcast from rank 0: the slices partition the global batch (no sample twice)
    together = torch.cat([r0["shuffled"], r1["shuffled"]]).flatten().sort().values
    assert torch.equal(together, torch.cat([r0["x"], r1["x"]]).flatten().sort().values)
