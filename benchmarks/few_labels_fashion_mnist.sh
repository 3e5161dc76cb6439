#!/bin/bash
# Issue 28's measurement on Fashion-MNIST: fine-tuning, kNN and the features probe with 1 %, 10 % and 100 % of the
# training labels, from a recipe's checkpoint (MoCo v2 or v3) and from random initialisation, in two lanes of one
# thread each (the 2 cores of the machine it was written for). Not a test: about 45 minutes of the two cores
# (20 with BASELINES=0).
#   bash benchmarks/few_labels_fashion_mnist.sh <out folder> <checkpoint> [<name>, default v2]
#   BASELINES=0 bash benchmarks/few_labels_fashion_mnist.sh <out folder> <MoCo v3 checkpoint> v3   # its rows only
# The checkpoints: python train.py experiment=fashion_mnist (v2) or experiment=fashion_mnist_mocov3 (v3)
# hydra.run.dir=<run> (<run>/checkpoints/last.ckpt). The random-weight baselines (ft_scratch_*, *_init_*) do not
# depend on the checkpoint: BASELINES=0 leaves them out. The encoder at initialisation is saved by
# benchmarks/init_checkpoint.py. Each run's folder holds results.json (top-1, label counts, wall time);
# <out>/lanes.done lists each run's exit status and wall time.
set -u
OUT=$(realpath "$1"); CKPT=$(realpath "$2"); NAME=${3:-v2}; BASELINES=${BASELINES:-1}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
export OMP_NUM_THREADS=1 WANDB_MODE=offline
mkdir -p "$OUT"
[ "$BASELINES" = 1 ] && $PY "$REPO/benchmarks/init_checkpoint.py" experiment=fashion_mnist --out "$OUT/init.ckpt"
run() {  # name, script, arguments...
  local name=$1 script=$2; shift 2; local t0; t0=$(date +%s)
  $PY "$REPO/$script" "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? wall=$(( $(date +%s) - t0 ))s" >> "$OUT/lanes.done"
}
# fine-tuning (finetune_recipe=sgd), validated every 15 epochs and after the last: 1 % = 600 images, 30 epochs of 10
# steps; 10 % = 6,000 images, 20 epochs; 100 %, 3 epochs (each within about 15 minutes on one thread). From random
# weights (checkpoint=none) the network is the checkpoint's: the recipe's ImageNet stem (model.cifar_stem=false)
ft() {  # name, checkpoint, fraction, seed, epochs, warm-up epochs
  local stem=(); [ "$2" = none ] && stem=(data=fashion_mnist model.cifar_stem=false)
  run "$1" eval_finetune.py checkpoint="$2" "${stem[@]}" label_fraction="$3" label_seed="$4" \
    trainer.max_epochs="$5" warmup_epochs="$6" trainer.check_val_every_n_epoch=15 trainer.enable_progress_bar=false
}
lane_a() {
  ft "ft_${NAME}_1pct_s0" "$CKPT" 0.01 0 30 3
  ft "ft_${NAME}_1pct_s1" "$CKPT" 0.01 1 30 3
  ft "ft_${NAME}_10pct_20ep" "$CKPT" 0.1 0 20 2
  run "probe_${NAME}_1pct" eval_linear.py linear_protocol=features checkpoint="$CKPT" label_fraction=0.01
  run "probe_${NAME}_10pct" eval_linear.py linear_protocol=features checkpoint="$CKPT" label_fraction=0.1
  run "knn_${NAME}_1pct" eval_knn.py checkpoint="$CKPT" label_fraction=0.01 device=cpu
  run "knn_${NAME}_10pct" eval_knn.py checkpoint="$CKPT" label_fraction=0.1 device=cpu
  [ "$BASELINES" = 1 ] || return 0
  ft ft_scratch_1pct_s0 none 0.01 0 30 3
  ft ft_scratch_1pct_s1 none 0.01 1 30 3
  ft ft_scratch_10pct_20ep none 0.1 0 20 2
  run knn_init_1pct eval_knn.py checkpoint="$OUT/init.ckpt" data=fashion_mnist label_fraction=0.01 device=cpu
  run knn_init_10pct eval_knn.py checkpoint="$OUT/init.ckpt" data=fashion_mnist label_fraction=0.1 device=cpu
  run probe_init_1pct eval_linear.py linear_protocol=features checkpoint="$OUT/init.ckpt" data=fashion_mnist \
    label_fraction=0.01
}
lane_b() {
  ft "ft_${NAME}_100pct_3ep" "$CKPT" 1.0 0 3 1
  [ "$BASELINES" = 1 ] || return 0
  ft ft_scratch_100pct_3ep none 1.0 0 3 1
}
lane_a & lane_b & wait
$PY "$REPO/benchmarks/few_labels_table.py" "$OUT"
