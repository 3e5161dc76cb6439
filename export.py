"""Export a checkpoint's backbone for torchvision / detectron2: ``python export.py CKPT`` (= ``moco-export``).

Examples::

    python export.py outputs/<date>/<time>/checkpoints/last.ckpt   # both formats next to the checkpoint
    python export.py run.ckpt --format detectron2 --output r50_d2.pkl
"""

from moco_lightning.cli.export import main

if __name__ == "__main__":
    main()
