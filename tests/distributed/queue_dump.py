"""A callback the two-process and two-node train.py tests add from the command line: each rank saves its state."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class QueueDump(L.Callback):
    """At the end of training, save what must be identical on every rank to ``<path>/rank<r>.pt``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        state = {
            "queue": pl_module.queue.detach().cpu().clone(),
            "ptr": int(pl_module.queue_ptr),
            "key_encoder": {k: v.detach().cpu().clone() for k, v in pl_module.encoder_k.state_dict().items()},
            "bn_mode": pl_module.bn_mode,
            "steps": trainer.global_step,
            "world_size": trainer.world_size,
            "hparams": dict(pl_module.hparams),  # the settings this rank trained with
            "num_nodes": trainer.num_nodes,
            "node_rank": trainer.node_rank,
            "cluster_environment": type(getattr(trainer.strategy, "cluster_environment", None)).__name__,
        }
        torch.save(state, self.path / f"rank{trainer.global_rank}.pt")


def assert_one_run_on_both_ranks(dumps: Path) -> tuple[dict, dict]:
    """Load the two ranks' dumps of a 3-step run of global batch 32 into K=64; check they hold one run, one queue."""
    r0, r1 = (torch.load(dumps / f"rank{r}.pt") for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2 and r0["steps"] == r1["steps"] == 3
    assert r0["bn_mode"] == r1["bn_mode"] == "shuffle"
    # 3 steps x global batch 32 = 96 keys into K=64: pointer 32 on both ranks, one queue
    assert r0["ptr"] == r1["ptr"] == 32
    assert torch.equal(r0["queue"], r1["queue"])
    for name, value in r0["key_encoder"].items():
        if name.endswith(("weight", "bias")):  # parameters follow the same EMA on every rank
            assert torch.equal(value, r1["key_encoder"][name]), name
    return r0, r1
