"""The supervised upper reference: the same ResNet trained with labels for a wall-time budget, then evaluated.

The backbone is built by the project's own :func:`~moco_lightning.backbones.build_backbone` with the name, stem and
image size of a MoCo config composed from ``conf/train.yaml`` (the same Hydra overrides as ``python train.py``, so
``data=fashion_mnist experiment=fashion_mnist`` builds what that experiment pretrains), topped with a linear
classifier and trained with cross-entropy, SGD (momentum 0.9) and a cosine schedule over the *wall time*: the lr
at time ``t`` of a budget ``T`` is ``lr x (1 + cos(pi t / T)) / 2``, and training stops at ``T`` (after the step
that crosses it). The training images are the datamodule's labelled training set with its linear-probe training
view (``--augment linear``, default) or one view of the pretraining augmentation (``--augment pretrain``), shuffled,
``data.batch_size`` per step. Afterwards (not counted in the budget) it reports the classifier's top-1 on the
evaluation set and the weighted-kNN top-1 of its backbone features (:func:`moco_lightning.eval.knn.knn_accuracy`,
k 200, t 0.1, as the kNN monitor), prints a table and writes JSON (to a new folder under
``outputs/benchmarks/``; ``--record`` updates ``benchmarks/results/supervised_reference_<dataset>.json``). Not a test.

    python benchmarks/supervised_reference.py data=digits --minutes 2
    python benchmarks/supervised_reference.py data=fashion_mnist experiment=fashion_mnist --minutes 30
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch
from common import add_output_arguments, output_path, write_results
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from moco_lightning.backbones import build_backbone
from moco_lightning.cli import CONFIG_PATH
from moco_lightning.eval.features import eval_mode
from moco_lightning.eval.knn import knn_accuracy
from moco_lightning.optim import build_optimizer


def compose_config(overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` with ``python train.py``-style overrides (``data=...``, ``experiment=...``)."""
    with initialize_config_dir(config_dir=CONFIG_PATH, version_base="1.3"):
        return compose("train", overrides=overrides)


class Classifier(nn.Module):
    """The MoCo config's backbone and a linear classifier on its features."""

    def __init__(self, cfg: DictConfig, num_classes: int) -> None:
        super().__init__()
        model = cfg.model
        options = {key: model[key] for key in ("image_size", "patch_size") if key in model}  # ViTs (MoCo v3)
        self.backbone, width = build_backbone(model.backbone, cifar_stem=bool(model.get("cifar_stem", False)),
                                              **options)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.backbone(x))


def training_batches(datamodule: Any, augment: str, batch_size: int) -> tuple[DataLoader, Any]:
    """Shuffled labelled training batches and what turns a loaded batch into images on the device."""
    if augment == "linear":
        dataset = datamodule.eval_dataset("train", augment=True)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                            num_workers=datamodule.num_workers, persistent_workers=datamodule.num_workers > 0,
                            generator=torch.Generator().manual_seed(0))
        return loader, lambda images: images
    datamodule.batch_size = batch_size
    loader = datamodule.train_dataloader()
    if datamodule.batch_augmentation:  # the loader gives the images; the recipe runs on the batch
        return loader, lambda images: datamodule.augment_batch((images, None))[0][0]
    return loader, lambda views: views[0]


def train_for(model: Classifier, loader: DataLoader, to_images: Any, seconds: float, lr: float,
              weight_decay: float, device: torch.device) -> dict[str, Any]:
    """SGD with a wall-time cosine schedule until ``seconds`` have passed; steps, epochs, wall and CPU time, losses."""
    optimizer = build_optimizer(model.parameters(), "sgd", lr=lr, momentum=0.9, weight_decay=weight_decay)
    model.train()
    steps, epochs, losses = 0, 0, []
    start, cpu_start = time.perf_counter(), time.process_time()
    elapsed = 0.0
    while elapsed < seconds:
        for images, labels in loader:
            images = to_images(images.to(device) if isinstance(images, torch.Tensor) else
                               [v.to(device) for v in images])
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, elapsed / seconds)))
            loss = F.cross_entropy(model(images), torch.as_tensor(labels).to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - start
            if elapsed >= seconds:
                break
        else:
            epochs += 1
    if steps == 0:
        raise RuntimeError("the training loader yielded no batch: lower data.batch_size")
    return {"steps": steps, "full_epochs": epochs, "train_seconds": elapsed,
            "train_cpu_seconds": time.process_time() - cpu_start,  # of this process, all its threads
            "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}


@torch.no_grad()
def evaluate(model: Classifier, datamodule: Any, device: torch.device) -> dict[str, float]:
    """Top-1 of the classifier on the evaluation set, and weighted-kNN top-1 of its backbone features."""
    with eval_mode(model):
        correct = total = 0
        for images, labels in datamodule.eval_val_dataloader():
            predictions = model(images.to(device)).argmax(1).cpu()
            correct += int((predictions == torch.as_tensor(labels)).sum())
            total += len(predictions)
        knn = knn_accuracy(model.backbone, datamodule.eval_train_dataloader(), datamodule.eval_val_dataloader(),
                           num_classes=getattr(datamodule, "num_classes", None) or None, device=device)
    return {"classifier_top1": correct / total, "knn_top1": knn["top1"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the options (``key=value`` arguments are Hydra overrides), train, evaluate, print, write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="key=value arguments are overrides of conf/train.yaml, as for train.py")
    parser.add_argument("--minutes", type=float, required=True, help="wall-time budget of the training")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD lr per 256 images (scaled by the batch)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--augment", choices=["linear", "pretrain"], default="linear",
                        help="linear: the linear-probe training view; pretrain: one view of the pretraining recipe")
    parser.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size of the config")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="auto", help="auto = cuda when available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser, "supervised_reference_<dataset>.json")
    args, overrides = parser.parse_known_args(argv)
    flags = [o for o in overrides if "=" not in o]
    if flags:
        parser.error(f"unknown option(s) {flags}; Hydra overrides are key=value (data=digits)")
    if args.minutes <= 0:
        parser.error(f"--minutes={args.minutes} must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    num_classes = int(datamodule.num_classes)
    batch_size = args.batch_size or int(cfg.data.batch_size)
    lr = args.lr * batch_size / 256
    model = Classifier(cfg, num_classes).to(device)
    loader, to_images = training_batches(datamodule, args.augment, batch_size)
    train = train_for(model, loader, to_images, 60.0 * args.minutes, lr, args.weight_decay, device)
    start = time.perf_counter()
    scores = evaluate(model, datamodule, device)
    dataset = getattr(datamodule, "dataset_name", type(datamodule).__name__)
    payload = {
        "benchmark": "supervised_reference",
        "command": "python benchmarks/supervised_reference.py " + " ".join(argv if argv is not None else
                                                                          sys.argv[1:]),
        "overrides": overrides,
        "dataset": dataset,
        "backbone": cfg.model.backbone,
        "cifar_stem": bool(cfg.model.get("cifar_stem", False)),
        "image_size": int(cfg.data.image_size),
        "augment": args.augment,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": args.weight_decay,
        "budget_minutes": args.minutes,
        "threads": torch.get_num_threads(),
        "device": str(device),
        **train,
        **scores,
        "eval_seconds": time.perf_counter() - start,
        "config": OmegaConf.to_container(cfg.data, resolve=True),
    }
    print(f"supervised {payload['backbone']} on {dataset} ({payload['image_size']} px, "
          f"{'CIFAR' if payload['cifar_stem'] else 'ImageNet'} stem), {args.minutes:g} min of training:")
    print(f"  {'steps / full epochs':<28}{train['steps']} / {train['full_epochs']}")
    print(f"  {'train wall / CPU seconds':<28}{train['train_seconds']:.0f} / {train['train_cpu_seconds']:.0f}")
    print(f"  {'train loss first / last':<28}{train['first_loss']:.3f} / {train['last_loss']:.3f}")
    print(f"  {'classifier top-1':<28}{100 * scores['classifier_top1']:.1f} %")
    print(f"  {'kNN top-1 (k 200, t 0.1)':<28}{100 * scores['knn_top1']:.1f} %")
    write_results(payload, output_path(args, f"supervised_reference_{dataset}.json"))
    return payload


if __name__ == "__main__":
    main()
