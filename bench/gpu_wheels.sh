#!/usr/bin/env bash
# Downloads the wheels that the GPU machine lacks (it has torch, timm, transformers, accelerate, pandas,
# matplotlib, pyyaml, ftfy-free regex...) into .whl/, for bench/gpu_check.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
for pkg in open_clip_torch==3.3.0 webdataset==1.0.2 ftfy wcwidth braceexpand; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform any -d .whl "$pkg"
done
ls .whl
