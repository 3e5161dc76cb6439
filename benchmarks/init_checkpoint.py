"""Save the encoder at initialisation as a checkpoint, so the evaluation CLIs can measure the "at init" baseline.

``python train.py <overrides>`` seeds with ``seed`` and builds its MoCo module before training; this script does
the same with the same overrides and saves the untrained module's ``state_dict`` and hyper-parameters (the part of a
moco-train checkpoint the evaluation entry points read). ``eval_knn.py`` on the result gives the kNN table's
"encoder at init" row, and ``eval_linear.py linear_protocol=features`` its linear probe. Not a test.

    python benchmarks/init_checkpoint.py experiment=fashion_mnist --out /tmp/fmnist_init.ckpt
    python eval_linear.py linear_protocol=features checkpoint=/tmp/fmnist_init.ckpt data=fashion_mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from supervised_reference import compose_config


def main() -> None:
    """Compose the config, seed, build the module as train.py does, save it untrained."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="python train.py overrides (experiment=..., seed=...)")
    parser.add_argument("--out", required=True, help="the checkpoint file to write")
    args = parser.parse_args()
    cfg = compose_config(args.overrides)
    L.seed_everything(cfg.seed)
    instantiate(cfg.data, _convert_="all")  # as train.py: the datamodule first, then the module
    model = instantiate(cfg.model, _convert_="all")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, out)
    print(f"saved the untrained {cfg.model.backbone} (seed {cfg.seed}) to {out}")


if __name__ == "__main__":
    main()
