#!/usr/bin/env bash
# One device call: the bf16 equivalence suite, pretrain.py on the Llama-3.2-1B config through
# accelerate_configs/single_gpu.yaml with --use_litespark, and a tiny pretrain through fsdp2.yaml with one process.
#   bash benchmarks/gpu_recipes_check.sh OUT_DIR [MAX_STEPS]
set -uo pipefail
OUT_DIR=${1:-benchmarks/results/gpu_recipes}
STEPS=${2:-40}
mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/kernels:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
python3 -m pytest -m gpu tests/gpu/test_equivalence_gpu.py -q -rfE -p no:cacheprovider 2>&1 \
  | tee "$OUT_DIR/equivalence_gpu.log" | tail -4
accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/pretrain.py \
  --config recipes/configs/pretrain_llama_1b.yaml --use_litespark --max_steps "$STEPS" --eval_steps 20 \
  --logging_steps 5 --save_steps 100000 --corpus_max_train_chars 4000000 --corpus_max_eval_chars 100000 \
  --disable_tqdm true --output_dir /tmp/pretrain_1b > "$OUT_DIR/pretrain_1b.log" 2>&1
echo "pretrain 1B exit $?"; grep -E "'loss'|eval_loss|\[pretrain\]|Error|error" "$OUT_DIR/pretrain_1b.log" | tail -25
cp /tmp/pretrain_1b/efficiency.json "$OUT_DIR/pretrain_1b_efficiency.json" 2>/dev/null
cp /tmp/pretrain_1b/efficiency.png "$OUT_DIR/pretrain_1b_efficiency.png" 2>/dev/null
accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 1 recipes/pretrain.py \
  --config recipes/configs/pretrain_tiny.yaml --use_litespark --max_steps 30 --disable_tqdm true \
  --output_dir /tmp/pretrain_fsdp2 > "$OUT_DIR/pretrain_tiny_fsdp2.log" 2>&1
echo "pretrain tiny fsdp2 exit $?"; grep -E "\[pretrain\]|Error" "$OUT_DIR/pretrain_tiny_fsdp2.log" | tail -5
