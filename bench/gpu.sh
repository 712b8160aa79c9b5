#!/usr/bin/env bash
# Every benchmark table at the real shapes on one CUDA GPU, each under its own time budget.
#
#   bash bench/gpu.sh OUT [--profile fast|full] [--only t1,t2] [--deadline-s S] [--device cuda|cpu]
#                         [--shapes auto|reduced|real|real-thin]
#
#   OUT           output folder; it receives at most 3 files: tables.md (every table, the GPU and
#                 the versions named), raw.json (every raw number), log.txt (every table's output)
#   --profile     fast (default): every table at the real shapes within --deadline-s (default
#                 400 s, i.e. about 7 minutes with the set-up) on one H200, model building
#                 included: fewer steps/samples, one warm-up, the compile row only if time is left.
#                 full: the scripts' own counts (~20-25 min on an H100; deadline 1800 s).
#   --only        a subset of: shapes, fused_head, train_step, train_gc, loader, dump
#   --deadline-s  the whole run's budget; each table stops at its own share and says so
#   --device cpu  the same tables at reduced shapes (the CPU check); --shapes real-thin: the real
#                 widths, vocabulary and 384 px images with one layer per model
#
# Random-init models of the real shapes (nothing is downloaded): SigLIP-so400m/14@384 (729
# visual tokens), Qwen2.5-3B teacher, Qwen2.5-0.5B student, 729 visual + 128 text tokens.
# The last thing printed is a compact summary of every table and of each target.
#
# Dependencies: the GPU machine has torch/transformers/accelerate/numpy/pyarrow but not zarr,
# numcodecs, donfig, google-crc32c, jsonschema (+ jsonschema-specifications, referencing,
# rpds-py). They travel as cp312 wheels in .whl/ (`make gpu-wheels`; bench/README.md has the device call). The run command
# installs them first, as the device notes say:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash bench/gpu.sh "$OUT"
#
# and, in case that was left out, this script does the same when zarr is missing and .whl/ is
# there. kdcache itself is used from this checkout (PYTHONPATH), not pip-installed.
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 2
fi
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if ! "$py" -c "import zarr, numcodecs, jsonschema" 2>/dev/null; then
  if compgen -G "$root/.whl/*.whl" >/dev/null; then
    echo "== installing $(ls "$root"/.whl/*.whl | wc -l) wheels from .whl/ into /tmp/site"
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$root"/.whl/*.whl || { echo "gpu.sh: installing .whl/*.whl failed: see the pip output above"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  "$py" -c "import zarr, numcodecs, jsonschema" || {
    echo "gpu.sh: zarr, numcodecs or jsonschema cannot be imported; run `make gpu-wheels` here and carry .whl/, or pip install them"
    exit 1; }
fi
exec "$py" "$here/gpu_run.py" "$@"
