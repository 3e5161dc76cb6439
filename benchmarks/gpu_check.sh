#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/gpu_check.py): on one GPU (sized for an H100) in under 8 minutes, the
# MoCo v2 ResNet-50 step in bf16 (eager, channels-last, compiled) with split and plain BN, the supervised step, the
# augmentation's images/s, host syncs by file and line, and a real train.py run under DDP (NCCL, one GPU).
# Prints a table and writes benchmarks/results/gpu_check.json.
#
#   benchmarks/gpu_check.sh                  # on a GPU machine, from anywhere
#   DRY=1 benchmarks/gpu_check.sh            # the CPU dry form: tiny sizes, gloo; writes to a temporary folder
#   benchmarks/gpu_check.sh --out DIR        # write gpu_check.json (and the run's log) into DIR
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh   # the interpreter to use (default: python on the PATH)
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
if [[ "${DRY:-0}" != 0 ]]; then
  args+=(--dry-run)
fi
if command -v nvidia-smi > /dev/null && [[ "${DRY:-0}" == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# the whole check within 8 minutes; compiled variants start only while its own budget (7 min) lasts
exec timeout 480 "${PYTHON:-python}" benchmarks/gpu_check.py ${args[@]+"${args[@]}"} "$@"
