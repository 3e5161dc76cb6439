"""Fine-tuning with a fraction of the labels: ``python eval_finetune.py checkpoint=...`` (= ``moco-finetune``).

    python eval_finetune.py checkpoint=outputs/<date>/<time>/checkpoints/last.ckpt label_fraction=0.01
    python eval_finetune.py checkpoint=none data=fashion_mnist label_fraction=0.01    # supervised baseline

The config is conf/eval_finetune.yaml; `python eval_finetune.py --help` lists the groups and options.
"""

from moco_lightning.cli.eval_finetune import main

if __name__ == "__main__":
    main()
