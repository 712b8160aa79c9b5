#!/usr/bin/env bash
# Every performance table of the README at the real shapes, on one CUDA GPU, logs under OUT.
#
#   bash bench/gpu.sh [OUT]          # default OUT = bench_out; ~20-25 min on an H100
#
# Random-init models of the real shapes (no download): SigLIP-so400m/14@384 (729 visual tokens),
# Qwen2.5-3B teacher, Qwen2.5-0.5B student, 729 visual + 128 text tokens. Each table is
# measured side by side in one run; see bench/README.md for what each row means.
set -euo pipefail
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}
run() {
  local name=$1; shift
  echo "== $name: $py $*" | tee "$out/$name.log"
  "$py" "$@" 2>&1 | tee -a "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
run fused_head  bench/fused_head.py --shapes real
run train_step  bench/train_step.py --shapes real
run train_gc    bench/train_step.py --shapes real --skip-online --gradient-checkpointing --batch-size 8
run loader      bench/loader.py --shapes real
run dump        bench/dump.py --preset random:qwen2.5-3b --batch-size 16 --num-samples 256 --compare-naive --compile
echo "logs in $out/"
