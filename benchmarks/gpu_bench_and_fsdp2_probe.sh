#!/usr/bin/env bash
# One device call: train_bench on the Llama-3.2-1B shape (all variants but eager, which OOMs at batch 4), then
# three tiny FSDP2 one-process pretrain runs that isolate the FSDP2 failure (litespark on/off, tied embeddings,
# cpu_ram_efficient_loading).   bash benchmarks/gpu_bench_and_fsdp2_probe.sh OUT_DIR
set -uo pipefail
OUT_DIR=${1:-benchmarks/results/gpu_bench}
mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/kernels:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
python3 benchmarks/train_bench.py --config llama-1b --variants sdpa,litespark,compile,litespark_compile,liger \
  --steps 14 --time-from 5 --out "$OUT_DIR" --tag h100 --no-progress > "$OUT_DIR/train_bench.log" 2>&1
echo "train_bench exit $?"; tail -14 "$OUT_DIR/train_bench.log"
sed 's/fsdp_cpu_ram_efficient_loading: true/fsdp_cpu_ram_efficient_loading: false/' accelerate_configs/fsdp2.yaml > /tmp/fsdp2_noeff.yaml
run() { name=$1; shift; accelerate launch "$@" --max_steps 10 --eval_on_start false --disable_tqdm true \
  --output_dir /tmp/fsdp_$name > /tmp/fsdp_$name.log 2>&1; rc=$?
  echo "== $name exit $rc"; grep -E "RuntimeError|Error:|\[pretrain\] held" /tmp/fsdp_$name.log | head -3; }
T="recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml"
run lit_tied --config_file accelerate_configs/fsdp2.yaml --num_processes 1 $T --use_litespark
run stock_tied --config_file accelerate_configs/fsdp2.yaml --num_processes 1 $T
run lit_untied --config_file accelerate_configs/fsdp2.yaml --num_processes 1 $T --use_litespark --tie_word_embeddings false
run lit_tied_noeff --config_file /tmp/fsdp2_noeff.yaml --num_processes 1 $T --use_litespark
tail -c 20000 /tmp/fsdp_lit_tied.log > "$OUT_DIR/fsdp_lit_tied.log"
