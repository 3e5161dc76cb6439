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
