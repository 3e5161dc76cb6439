"""Linear evaluation, official MoCo protocol: ``python eval_linear.py checkpoint=...`` (= ``moco-eval-linear``).

    python eval_linear.py checkpoint=outputs/<date>/<time>/checkpoints/last.ckpt
    python eval_linear.py checkpoint=run.ckpt data=imagenet data.data_dir=/datasets/imagenet trainer.devices=8

The config is conf/eval_linear.yaml; `python eval_linear.py --help` lists the groups and options.
"""

from moco_lightning.cli.eval_linear import main

if __name__ == "__main__":
    main()
