#!/usr/bin/env bash
# The GPU measurement of issue 3/4 (paper Table 4's shape), as ONE prepared run for the lent
# GPU machine (`device` tool): ResNet50 at 224 px, batch 32, every method with and without
# DA-WSOL (MMD, DANN), fp32 and then bf16 autocast + channels_last, plus the batched assigner.
# The GPU image has torch/torchvision/numba/OpenCV but no registry, so the package is placed on
# PYTHONPATH as a copy of its three folders (the same mapping as pyproject's package-dir).
#   usage: bash benchmarks/gpu_table4.sh [OUTDIR] [extra train_step.py args, e.g. --device cpu]
set -uo pipefail
out=${1:-${OUT:-/tmp}}; shift || true
site=$(mktemp -d)
mkdir -p "$site/wsolbench"
cp -r harness/. "$site/wsolbench/"
cp -r methods "$site/wsolbench/methods"
cp -r datasets "$site/wsolbench/datasets"
export PYTHONPATH="$site" PYTHONUNBUFFERED=1
log="$out/gpu_table4.log"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  python3 -c "import torch, torchvision, numba, cv2, numpy; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'numba', numba.__version__, 'cv2', cv2.__version__, 'numpy', numpy.__version__)"
  python3 -c "import wsolbench.experiment" || exit 1
  # The batched-assigner rows first: the whole script took over 540 s with 15 steps a row on an
  # H100 (2026-11-26), the sequential-assigner DA-WSOL rows at ~0.6 s a step; with 10 steps the
  # whole script should take about 400 s there (an estimate from that run, not a measurement).
  python3 benchmarks/train_step.py --methods cam --uda none,mmd --assigner-mode batched --steps 10 --warmup 3 "$@"
  python3 benchmarks/train_step.py --methods cam --uda none,mmd --assigner-mode batched --steps 10 --warmup 3 \
      --precision bf16 --channels-last "$@"
  python3 benchmarks/train_step.py --methods cam,has,acol,spg,adl,cutmix --steps 10 --warmup 3 "$@"
  python3 benchmarks/train_step.py --methods cam,has,acol,spg,adl,cutmix --steps 10 --warmup 3 \
      --precision bf16 --channels-last "$@"
  date -u
} 2>&1 | tee "$log"
