#!/usr/bin/env bash
# One device call: the GPU correctness suite (bf16/fp16; `pytest -m gpu tests/gpu`) and every kernel benchmark.
#   bash benchmarks/gpu_check.sh OUT_DIR
# Writes gpu_tests.log, kernel_bench.log, kernel_benchmarks.json, one PNG per kernel group and device.txt to OUT_DIR.
set -uo pipefail
OUT_DIR=${1:-benchmarks/results/gpu_check}
mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/kernels:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv > "$OUT_DIR/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$OUT_DIR/device.txt"
cat "$OUT_DIR/device.txt"
python3 -m pytest -m gpu tests/gpu -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25
python3 benchmarks/run_kernel_benchmarks.py --out "$OUT_DIR" 2>&1 > "$OUT_DIR/kernel_bench.log"
tail -60 "$OUT_DIR/kernel_bench.log"
