#!/usr/bin/env bash
# GPU measurements and checks on a machine with CUDA, into one JSON (vpr_ros/bench/gpu_check.py):
# the CUDA tests that skip elsewhere, CUDA fp16 vs fp32 descriptor cosine on real Nordland images,
# the GPU preprocessing twin vs the CPU preprocessing, encoder latency/throughput rows (torch fp32,
# fp16, fp16 + CUDA graphs, ONNX Runtime CUDA) and a map-search row where a GPU build of faiss
# imports. Needs only this repository and a Python with torch + timm (onnxruntime-gpu, faiss-gpu,
# pytest, opencv optional): no project venv, no network. Parts that cannot run are listed under
# "skipped" with the reason.
#
#   scripts/gpu_check.sh [OUT.json] [extra options, e.g. --iters 50 --map-rows 200000]
#   GPU_CHECK_WHEELS=DIR scripts/gpu_check.sh   # first install small wheels from DIR (offline)
#   PYTHON=python3.11 scripts/gpu_check.sh      # which interpreter (default python3)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
out=${1:-gpu_check.json}
[ $# -gt 0 ] && shift
if [ -n "${GPU_CHECK_WHEELS:-}" ]; then
  site="$here/.gpu_check_site"
  "$py" -m pip install -q --no-index --find-links "$GPU_CHECK_WHEELS" --target "$site" \
    "$GPU_CHECK_WHEELS"/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# The venv's ROS libraries are not needed; the shared Nordland data is found beside the checkout
# (../shared/data) or through VPR_SHARED_DATA.
cd "$here"
exec "$py" -m vpr_ros.bench.gpu_check --out "$out" "$@"
