#!/usr/bin/env bash
# The GPU measurement of issues 3/4 and 12 (paper Table 4's shape), as ONE prepared run for the lent
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
  # Issue 12: the DA methods (cam, has, cutmix, adl) with {none, mmd, dann}, the sequential
  # assigner's speculative engine, fp32 then bf16 + channels_last; then CAM + MMD with the
  # per-image engine (the engine before issue 12) for the before/after ratio, and the batched
  # (non-reference) assigner. Estimated 5-7 minutes on an H100 (not yet measured).
  python3 benchmarks/train_step.py --methods cam,has,cutmix,adl --steps 10 --warmup 3 "$@"
  python3 benchmarks/train_step.py --methods cam,has,cutmix,adl --steps 10 --warmup 3 \
      --precision bf16 --channels-last "$@"
  python3 benchmarks/train_step.py --methods cam --uda none,mmd --sequential-engine per_image --steps 5 --warmup 2 "$@"
  python3 benchmarks/train_step.py --methods cam --uda none,mmd --assigner-mode batched --steps 10 --warmup 3 "$@"
  # The TSA alone on one batch's features, per engine (last: the least needed if time runs out).
  (cd benchmarks && python3 gpu_tsa_probe.py)
  date -u
} 2>&1 | tee "$log"
