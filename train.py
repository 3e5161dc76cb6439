"""Pretrain MoCo: ``python train.py [overrides]`` (the same as the console script ``moco-train``).

    python train.py                                      # digits, ResNet-18, CPU: a minute or two
    python train.py backbone=resnet50 trainer.devices=8  # 8-GPU DDP, lr scaled to the global batch
    python train.py experiment=imagenet_mocov2 data.data_dir=/datasets/imagenet
    python train.py -m model.momentum=0.99,0.999 model.queue_size=1024,4096
    python train.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt   # resume

The configs live in conf/ (see conf/train.yaml); `python train.py --help` lists the groups and options.
"""

from moco_lightning.cli.train import main

if __name__ == "__main__":
    main()
