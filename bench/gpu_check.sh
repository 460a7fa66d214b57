#!/usr/bin/env bash
# GPU check (about 6 minutes on one H200): ViT-B-32, batch 512, bf16, CLIP vs iSogCLR.
#  1. the training step alone on random batches (samples/s, peak memory), side by side;
#  2. the whole trainer on synthetic shards through the loader (samples/s from metrics.jsonl).
# On a machine without open_clip_torch/webdataset, put their wheels in .whl/ first (bench/gpu_wheels.sh).
# Usage: bash bench/gpu_check.sh [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 bench/gpu_check.py --output "${1:-${OUT:-gpu_check}}"
