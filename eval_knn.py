"""Weighted kNN accuracy of a checkpoint: ``python eval_knn.py checkpoint=...`` (= ``moco-eval-knn``).

    python eval_knn.py checkpoint=outputs/<date>/<time>/checkpoints/last.ckpt
    python eval_knn.py checkpoint=run.ckpt data=cifar10 k=20 temperature=0.07

The config is conf/eval_knn.yaml; `python eval_knn.py --help` lists the groups and options.
"""

from moco_lightning.cli.eval_knn import main

if __name__ == "__main__":
    main()
