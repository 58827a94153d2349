#!/usr/bin/env bash
# The GPU figures of the README's "Performance" section, as one run on a single H200:
#   bash bench/h200.sh [OUT_DIR]      (logs go to OUT_DIR, default $OUT or bench_out)
# Stops at once when oaml_jax cannot compile a small QAConv loss on the GPU; otherwise runs every benchmark
# under its own time limit, so one that fails or runs long leaves the others' figures.
set -u -o pipefail
out=${1:-${OUT:-bench_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
python3 bench/qaconv_train.py --sweep=64:64:32 --repeats=2 --warmup=1 2>&1 | tee "$out/smoke.txt" || exit 1
grep -q failed "$out/smoke.txt" && exit 1
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__)" \
  | tee -a "$out/device.txt"
timeout 120 python3 bench/qaconv_train.py --old --sweep=512:512:0,512:512:512 2>&1 | tee "$out/qaconv_matcher.txt"
for mb in 64 1024 4096; do
  timeout 40 python3 bench/qaconv_train.py --sweep=512:512:0 --block_mb=$mb 2>&1 | tail -1 | sed "s/^/block_mb=$mb /"
done | tee "$out/qaconv_blocks.txt"
timeout 270 python3 bench/train_step.py --arch=ir_50 --batch=512 --dtype=bfloat16 --mode=both --num_classes=85742 \
  --qaconv_group_size=0,128 --steps=20 2>&1 | grep -v '^[IW][0-9]' | tee "$out/train_step.txt"
timeout 150 python3 bench/qaconv_train.py \
  --sweep=256:512:128,256:1024:128,256:2048:128,256:4096:128,256:8192:128,256:512:0,256:1024:0,256:2048:0,256:4096:0,256:8192:0 \
  2>&1 | tee "$out/qaconv_scale.txt"
timeout 40 python3 bench/qaconv_scoring.py 2>&1 | grep -v '^[IW][0-9]' | tee "$out/qaconv_scoring.txt"
