"""Run by test_lightning_ddp.py: a few MoCo steps under Lightning's own DDP on 2 CPU processes (gloo).

Each rank saves its queue, pointer and key-encoder weights to OUT_DIR/rank{r}.pt.
"""

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from moco_lightning import MoCo


class Views(Dataset):
    def __init__(self, n: int = 32) -> None:
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return (self.x[i], self.x[i].flip(-1)), 0


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model = MoCo("resnet18", cifar_stem=True, dim=8, queue_size=16, momentum=0.9, temperature=0.2,
                 lr=0.01, lr_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(Views(), batch_size=4, shuffle=True, drop_last=True))
    torch.save({"queue": model.queue.clone(), "ptr": int(model.queue_ptr),
                "key_conv": model.encoder_k.backbone.conv1.weight.detach().clone(),
                "steps": trainer.global_step},
               Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
