"""Measure one MoCo recipe on the embedded digits: kNN top-1 of the trained encoder, the same encoder at
initialisation, and raw pixels. Prints a table row and appends a JSON record.

    python benchmarks/digits_recipe.py --epochs 8 --image-size 16 --lr 0.06 --queue-size 256
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import lightning as L
import torch
from common import add_output_arguments, output_path

from moco_lightning import MoCo
from moco_lightning.data import DigitsDataModule
from moco_lightning.eval.knn import knn_accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--momentum", type=float, default=0.99)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--no-mlp", action="store_true")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--augmentation", default="digits")
    p.add_argument("--aug-kwargs", default="{}", help="JSON dict passed to the augmentation builder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    add_output_arguments(p, "digits_recipes.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(args.seed, verbose=False)

    dm = DigitsDataModule(batch_size=args.batch_size, image_size=args.image_size, augmentation=args.augmentation,
                          augmentation_kwargs=json.loads(args.aug_kwargs), seed=args.seed)
    dm.setup("fit")
    model = MoCo(args.backbone, cifar_stem=True, dim=args.dim, queue_size=args.queue_size, momentum=args.momentum,
                 temperature=args.temperature, mlp=not args.no_mlp, lr=args.lr, weight_decay=args.weight_decay,
                 lr_schedule="cosine")
    init_backbone = copy.deepcopy(model.encoder_q.backbone).eval()

    def knn(fn):
        return knn_accuracy(fn, dm.eval_train_dataloader(), dm.eval_val_dataloader(), num_classes=10)["top1"]

    raw = knn(lambda x: x.flatten(1))
    init = knn(init_backbone)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    model.eval()
    trained = knn(model.embed)
    record = {**vars(args), "knn_trained": trained, "knn_init": init, "knn_raw_pixels": raw,
              "train_seconds": round(seconds, 1), "steps": trainer.global_step}
    print(f"| {args.image_size} px | ep {args.epochs} | lr {args.lr} | K {args.queue_size} | T {args.temperature} | "
          f"aug {args.augmentation} {args.aug_kwargs} | trained {100 * trained:.1f} | init {100 * init:.1f} | "
          f"raw {100 * raw:.1f} | {seconds:.0f} s |")
    out = output_path(args, "digits_recipes.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
