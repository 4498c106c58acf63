#!/usr/bin/env bash
# The project's GPU runs, one command per device call (run from the repository root on a CUDA machine):
#
#   bash benchmarks/gpu_run.sh COMMAND[,COMMAND...] [OUT_DIR] [MAX_STEPS]
#
#   tests        the GPU correctness suite (bf16/fp16; `pytest -m gpu tests/gpu`): gpu_tests.log
#   kernels      every kernel benchmark (benchmarks/run_kernel_benchmarks.py): kernel_bench.log (stdout),
#                kernel_benchmarks_<device>.json and one <group>_<device>.png per kernel group
#   recipes      the bf16 equivalence suite (equivalence_gpu.log); recipes/pretrain.py on the Llama-3.2-1B config
#                through accelerate_configs/single_gpu.yaml with --use_litespark for MAX_STEPS steps (default 40;
#                pretrain_1b.log, pretrain_recipe_llama-1b_<device>.json/.png: the run's efficiency.json/.png);
#                a tiny pretrain through fsdp2.yaml with one process (pretrain_tiny_fsdp2.log)
#   train        litespark-train-bench on the Llama-3.2-1B shape, every variant but eager (out of memory at batch
#                4): sdpa, compile, liger, litespark, litespark_compile, litespark_fp8, litespark_cudnn; 14 steps
#                with 5-14 timed:
#                train_bench.log, train_bench_llama-1b_<device>.json/.png
#   fsdp2-probe  four tiny FSDP2 one-process pretrain runs that isolate the FSDP2 evaluate() failure (litespark
#                on/off, untied embeddings, cpu_ram_efficient_loading off): summary on stdout, fsdp_lit_tied.log
#   engines      issue #20 at world size 1 on one GPU (needs the deepspeed wheel, .whl/): (a) recipes/pretrain.py,
#                sft.py, dpo.py with --use_litespark through fsdp2.yaml and deepspeed_zero3.yaml, 6 steps each on a
#                tiny Llama: train + evaluate + save, reload with plain from_pretrained (logits vs the in-run model),
#                resume from the sharded checkpoint (losses vs the uninterrupted run); one PASS/FAIL line per check
#                (benchmarks/engines_check.py; engines_check.log, engines_check.json); (b) litespark-train-bench on
#                the Llama-3.2-1B shape, sdpa and litespark, --engine fsdp2 and zero3, 12 steps with 6-12 timed:
#                train_bench_engines.log, train_bench_llama-1b_<engine>_<device>.json/.png
#   families     issue #16: the family GPU tests (tests/gpu/test_families_gpu.py, test_moe_gpu.py; families_gpu.log),
#                then litespark-train-bench on every config of litespark_hf/efficiency/family_configs.py (sdpa,
#                litespark, liger; in one process per config, 8 steps with 4-8 timed; MoE first; a config is skipped
#                once 500 s have passed; on the H200 the ten configs took ~11 min, so the last ones may need a second
#                call; FAMILIES="c1 c2" runs only those): bench_<config>.log,
#                train_bench_<config>_<device>.json/.png
#   sat          issue #19: benchmarks/bench_sat.py --profile, SAT on top of Litespark with dense Litespark as the
#                reference: the MLP microbenchmark; pre-training rows on the Llama-3.2-1B shape (stock, litespark,
#                litespark+SAT at 0.25/0.5 x freeze on/off, constant rate; 14 steps, 5-14 timed) and one profiled
#                SAT 0.5 step; TRL SFT dense Litespark vs ladder SAT 0.5 on the post-bench length distribution (a
#                24-step priming pass, then 96 steps each, held-out loss at the end); time-boxed to SAT_TIMEOUT
#                (default 480 s; SAT_MODES=pretrain for those rows alone, SAT_ARGS for more options, e.g.
#                --skip-micro), ~2-6 min
#                estimated; the JSON is rewritten after every row): bench_sat.log, bench_sat_<device>.json/.png,
#                profile_sat_step_<device>.txt
#   verify       what session 8 wrote after its last GPU call: the GPU tests never run yet (head-dim-256 attention
#                at the sweep's faster configs, torch.compile custom ops, LitesparkAdamW under FSDP2, the fused loss
#                with an odd vocabulary; verify_tests.log), then the two bench rows they should move: granite-1b
#                (sdpa, litespark, liger: the padded-vocabulary loss) and llama-1b and llama-3b under FSDP2 (sdpa,
#                litespark: LitesparkAdamW on the shards); ~8 min estimated: bench_granite-1b.log, bench_fsdp2.log,
#                bench_fsdp2_3b.log and their train_bench_*_<device>.json/.png
#   fp8          issue #17 item 2: the GPU tests written in session 9 (tests/gpu/test_fp8_gpu.py, the cuDNN attention
#                choice, SAT's gathered-GEMM sparse MLP; fp8_gpu.log); recipes/pretrain.py
#                on the 1B config for FP8_STEPS (default 300) steps, bf16 and --fp8 true, compared by
#                benchmarks/fp8_quality.py (fp8_quality.log, pretrain_1b_bf16.log, pretrain_1b_fp8.log,
#                fp8_quality_llama-1b_<device>.json/.png); ~6 min estimated (the speed is `train`'s litespark_fp8 row)
#   post         issue #14: litespark-train-bench --suite post on the Llama-3.2-1B shape (POST_CONFIG=llama-3b for
#                the 3B one: fewer modes per call), TRL's defaults, the six modes (POST_MODES) x stock, liger,
#                litespark (POST_VARIANTS); 14 steps with 8-14 timed (POST_STEPS, POST_TIME_FROM), time-boxed to 545 s (POST_TIMEOUT; the JSON is rewritten after every run; the 18
#                runs take ~25-30 s each, so give this command a call of its own): post_bench.log,
#                post_training_<config>_<device>.json/.png
#   post-profile the GPU tests of the post-training paths (post_gpu_tests.log: checkpoint_layers, lora_linear; skipped
#                with POST_PROFILE_TESTS=0), then the Litespark steps of POST_PROFILE_MODES (default "dpo_lora
#                sft_lora") profiled (profile_post_<mode>.txt: torch.profiler; cprofile_post_<mode>.prof/.prof.txt:
#                cProfile); ~5 min estimated
#   post-tests   the GPU tests of the post-training and sharded paths alone (post_gpu_tests.log: checkpoint_layers,
#                lora_linear, LitesparkAdamW (and checkpoint_layers) under FSDP2, the AdamW kernel with and without
#                SAT's frozen masks); ~2 min
#   fsdp2        issue #20's kept ratio in one call: litespark-train-bench on the Llama-3.2-1B shape, sdpa and
#                litespark, --engine none (in OUT_DIR/none/, so that the seven-variant one-device file is not
#                replaced) then --engine fsdp2, 12 steps with 6-12 timed (FSDP2_REPEATS, default 1, runs the pair
#                again; each repeat's tables stay in bench_fsdp2_pair.log); ~2 min per repeat. FSDP2_VARIANTS
#                (default sdpa,litespark) for the FSDP2 rows, e.g. with the litespark_clip_unfolded /
#                litespark_torch_adamw diagnostics (FSDP2_VARIANTS_FSDP2 / FSDP2_VARIANTS_ZERO3 for one engine's rows:
#                litespark_no_prefetch, litespark_zero3_fine); FSDP2_NONE_VARIANTS (default sdpa,litespark; for llama-3b,
#                which checkpoints, also litespark_checkpoint_all) for the one-device rows; FSDP2_ENGINES (default "none fsdp2"); FSDP2_CONFIG (default llama-1b; a
#                space-separated list runs each; llama-3b runs 10 steps with 5-10 timed); FSDP2_PROFILE=1 adds a torch.profiler window of the FSDP2
#                litespark step (profile_<config>_fsdp2_<device>.json)
#   launch       the Triton launch shortcut (litespark_kernels/_launch.py): its GPU test (every wrapped kernel bit
#                for bit against Triton's own launch; launch_gpu_tests.log), then benchmarks/bench_host_overhead.py
#                --breakdown (host time of the 1B model's forward at 16 tokens: sdpa, litespark, litespark with
#                Triton's launch; per op; per layer of one RMSNorm call): host_overhead.log,
#                host_overhead_<device>.json/.png; ~1 min
#   all          tests,kernels,recipes,train,fsdp2-probe,engines,families,sat
#
# OUT_DIR defaults to outputs/gpu_run. Every command also writes device.txt (GPU name, driver, power limit,
# memory; torch/triton/transformers versions). A failing step is reported ("== STEP exit N") and the next step
# still runs; the exit status is 1 when a step failed, 2 for a usage error. <device> is the short tag of
# litespark_hf.efficiency.device.device_tag (h100, h200, ...). PYTHON picks the interpreter (default python3).
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
}

COMMANDS=${1:-}
OUT_DIR=${2:-outputs/gpu_run}
STEPS=${3:-40}
PYTHON=${PYTHON:-python3}
case "$COMMANDS" in
  -h|--help) usage; exit 0 ;;
  "") usage; exit 2 ;;
  all) COMMANDS=tests,kernels,recipes,train,fsdp2-probe,engines,families,sat ;;
esac
IFS=, read -r -a CMDS <<< "$COMMANDS"
for c in "${CMDS[@]}"; do
  case "$c" in
    tests|kernels|recipes|train|fsdp2-probe|engines|families|sat|verify|fp8|post|post-profile|post-tests|fsdp2|launch) ;;
    *) echo "gpu_run.sh: unknown command '$c'" >&2; usage; exit 2 ;;
  esac
done

mkdir -p "$OUT_DIR"
export PYTHONPATH=${PYTHONPATH:-}:$PWD/kernels:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
FAILED=()

step() {  # step NAME FUNCTION: run it, report its exit status and time; a failure is recorded and the run goes on
  local name=$1 rc=0 t0=$SECONDS
  shift
  "$@" || rc=$?
  echo "== $name exit $rc ($((SECONDS - t0)) s)"
  if (( rc != 0 )); then FAILED+=("$name"); fi
}

device_info() {
  local rc=0
  nvidia-smi --query-gpu=name,driver_version,power.limit,memory.total --format=csv > "$OUT_DIR/device.txt" || rc=$?
  "$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> "$OUT_DIR/device.txt" || rc=$?
  cat "$OUT_DIR/device.txt"
  return $rc
}

gpu_tests() {
  "$PYTHON" -m pytest -m gpu tests/gpu -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log" | tail -25
}

kernel_benchmarks() {  # stdout to the log, stderr (tracebacks) on the console
  local rc=0
  "$PYTHON" benchmarks/run_kernel_benchmarks.py --out "$OUT_DIR" > "$OUT_DIR/kernel_bench.log" || rc=$?
  tail -60 "$OUT_DIR/kernel_bench.log"
  return $rc
}

equivalence_tests() {
  "$PYTHON" -m pytest -m gpu tests/gpu/test_equivalence_gpu.py -q -rfE -p no:cacheprovider 2>&1 \
    | tee "$OUT_DIR/equivalence_gpu.log" | tail -4
}

pretrain_1b() {
  local rc=0 dev
  accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/pretrain.py \
    --config recipes/configs/pretrain_llama_1b.yaml --use_litespark --max_steps "$STEPS" --eval_steps 20 \
    --logging_steps 5 --save_steps 100000 --corpus_max_train_chars 4000000 --corpus_max_eval_chars 100000 \
    --disable_tqdm true --output_dir /tmp/pretrain_1b > "$OUT_DIR/pretrain_1b.log" 2>&1 || rc=$?
  grep -E "'loss'|eval_loss|\[pretrain\]|Error|error" "$OUT_DIR/pretrain_1b.log" | tail -25 || true
  dev=$("$PYTHON" -c "from litespark_hf.efficiency.device import device_tag; print(device_tag())" 2>/dev/null) || dev=gpu
  cp /tmp/pretrain_1b/efficiency.json "$OUT_DIR/pretrain_recipe_llama-1b_$dev.json" 2>/dev/null || true
  cp /tmp/pretrain_1b/efficiency.png "$OUT_DIR/pretrain_recipe_llama-1b_$dev.png" 2>/dev/null || true
  return $rc
}

pretrain_tiny_fsdp2() {
  local rc=0
  accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 1 recipes/pretrain.py \
    --config recipes/configs/pretrain_tiny.yaml --use_litespark --max_steps 30 --disable_tqdm true \
    --output_dir /tmp/pretrain_fsdp2 > "$OUT_DIR/pretrain_tiny_fsdp2.log" 2>&1 || rc=$?
  grep -E "\[pretrain\]|Error" "$OUT_DIR/pretrain_tiny_fsdp2.log" | tail -5 || true
  return $rc
}

train_bench() {
  local rc=0
  "$PYTHON" benchmarks/train_bench.py --config llama-1b \
    --variants sdpa,compile,liger,litespark,litespark_compile,litespark_fp8,litespark_cudnn \
    --steps 14 --time-from 5 --out "$OUT_DIR" --no-progress > "$OUT_DIR/train_bench.log" 2>&1 || rc=$?
  tail -16 "$OUT_DIR/train_bench.log"
  return $rc
}

fsdp2_run() {  # fsdp2_run NAME ACCELERATE-ARGS...: a 10-step tiny pretrain, its errors and held-out loss
  local name=$1 rc=0
  shift
  accelerate launch "$@" --max_steps 10 --eval_on_start false --disable_tqdm true \
    --output_dir "/tmp/fsdp_$name" > "/tmp/fsdp_$name.log" 2>&1 || rc=$?
  grep -E "RuntimeError|Error:|\[pretrain\] held" "/tmp/fsdp_$name.log" | head -3 || true
  return $rc
}

fsdp2_probe() {
  local t=(recipes/pretrain.py --config recipes/configs/pretrain_tiny.yaml)
  sed 's/fsdp_cpu_ram_efficient_loading: true/fsdp_cpu_ram_efficient_loading: false/' accelerate_configs/fsdp2.yaml \
    > /tmp/fsdp2_noeff.yaml
  step fsdp2-lit_tied fsdp2_run lit_tied --config_file accelerate_configs/fsdp2.yaml --num_processes 1 "${t[@]}" \
    --use_litespark
  step fsdp2-stock_tied fsdp2_run stock_tied --config_file accelerate_configs/fsdp2.yaml --num_processes 1 "${t[@]}"
  step fsdp2-lit_untied fsdp2_run lit_untied --config_file accelerate_configs/fsdp2.yaml --num_processes 1 "${t[@]}" \
    --use_litespark --tie_word_embeddings false
  step fsdp2-lit_tied_noeff fsdp2_run lit_tied_noeff --config_file /tmp/fsdp2_noeff.yaml --num_processes 1 "${t[@]}" \
    --use_litespark
  tail -c 20000 /tmp/fsdp_lit_tied.log > "$OUT_DIR/fsdp_lit_tied.log" || true
}

engines_check() {  # the recipes under both engines; work files in /tmp, the summary and the log in OUT_DIR
  local rc=0
  "$PYTHON" benchmarks/engines_check.py --out /tmp/engines_check --engines fsdp2,zero3 \
    > "$OUT_DIR/engines_check.log" 2>&1 || rc=$?
  grep -E "^(PASS|FAIL) |^engines_check:" "$OUT_DIR/engines_check.log" || tail -20 "$OUT_DIR/engines_check.log"
  cp /tmp/engines_check/engines_check.json "$OUT_DIR/" 2>/dev/null || true
  return $rc
}

engines_bench() {
  local rc=0 engine
  for engine in fsdp2 zero3; do
    "$PYTHON" benchmarks/train_bench.py --config llama-1b --engine "$engine" --variants sdpa,litespark \
      --steps 12 --time-from 6 --out "$OUT_DIR" --no-progress >> "$OUT_DIR/train_bench_engines.log" 2>&1 || rc=$?
    grep -E "^\| (sdpa|litespark) " "$OUT_DIR/train_bench_engines.log" | tail -2 | sed "s/^/$engine /"
  done
  return $rc
}

families_gpu_tests() {
  timeout 200 "$PYTHON" -m pytest -m gpu tests/gpu/test_families_gpu.py tests/gpu/test_moe_gpu.py -q -rfE \
    -p no:cacheprovider --timeout 120 2>&1 | tee "$OUT_DIR/families_gpu.log" | tail -8
}

families_bench() {  # one process per config (variants in-process: no per-variant import), time-boxed
  local rc=0 c t0 el configs
  t0=$(date +%s)
  configs=${FAMILIES:-}  # FAMILIES="gemma2-1b granite-1b": only those
  [ -n "$configs" ] || configs=$("$PYTHON" -c "from litespark_hf.efficiency.family_configs import FAMILY_CONFIGS as F
print(' '.join(sorted(F, key=lambda c: ('moe' not in c, c))))")
  for c in $configs; do
    el=$(( $(date +%s) - t0 ))
    if (( el > 500 )); then echo "families: skipped $c (${el} s elapsed)"; continue; fi
    timeout $(( 560 - el )) "$PYTHON" -m litespark_hf.efficiency.bench --config "$c" --variants sdpa,litespark,liger \
      --steps 8 --time-from 4 --no-isolate --no-progress --out "$OUT_DIR" > "$OUT_DIR/bench_$c.log" 2>&1 || rc=$?
    echo "families: $c done at $(( $(date +%s) - t0 )) s"
    grep -E "^\| (sdpa|litespark|liger) " "$OUT_DIR/bench_$c.log" | cut -d"|" -f2,4,10 | sed "s/^/  /"
  done
  return $rc
}

verify_tests() {
  timeout 260 "$PYTHON" -m pytest -m gpu tests/gpu/test_custom_ops_gpu.py tests/gpu/test_fsdp2_adamw_gpu.py \
    tests/gpu/test_fused_linear_cross_entropy_gpu.py "tests/gpu/test_attention_gpu.py::test_head_dim_256_configs" \
    -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT_DIR/verify_tests.log" | tail -12
}

verify_bench() {
  local rc=0
  timeout 80 "$PYTHON" -m litespark_hf.efficiency.bench --config granite-1b --variants sdpa,litespark,liger --steps 8 \
    --time-from 4 --no-isolate --no-progress --out "$OUT_DIR" > "$OUT_DIR/bench_granite-1b.log" 2>&1 || rc=$?
  grep -E "^\| (sdpa|litespark|liger) " "$OUT_DIR/bench_granite-1b.log" | cut -d"|" -f2,4,10 | sed "s/^/granite /"
  timeout 100 "$PYTHON" benchmarks/train_bench.py --config llama-1b --engine fsdp2 --variants sdpa,litespark \
    --steps 12 --time-from 6 --out "$OUT_DIR" --no-progress > "$OUT_DIR/bench_fsdp2.log" 2>&1 || rc=$?
  grep -E "^\| (sdpa|litespark) " "$OUT_DIR/bench_fsdp2.log" | cut -d"|" -f2,4,10 | sed "s/^/fsdp2 /"
  timeout 140 "$PYTHON" benchmarks/train_bench.py --config llama-3b --engine fsdp2 --variants sdpa,litespark \
    --steps 10 --time-from 5 --out "$OUT_DIR" --no-progress > "$OUT_DIR/bench_fsdp2_3b.log" 2>&1 || rc=$?
  grep -E "^\| (sdpa|litespark) " "$OUT_DIR/bench_fsdp2_3b.log" | cut -d"|" -f2,4,10 | sed "s/^/fsdp2-3b /"
  return $rc
}

fp8_tests() {
  timeout 200 "$PYTHON" -m pytest -m gpu tests/gpu/test_fp8_gpu.py \
    "tests/gpu/test_attention_gpu.py::test_attention_cudnn_plain_causal" \
    "tests/gpu/test_sat_gpu.py::test_sparse_gated_mlp_fused_bf16" -q -rfE -p no:cacheprovider 2>&1 \
    | tee "$OUT_DIR/fp8_gpu.log" | tail -8
}

post_bench() {  # issue #14: the whole post suite, 18 isolated runs of ~25-30 s each (most of it imports and TRL's
  # set-up): it needs a call of its own (call 4 of session 11 ran out at 440 s after 15 rows)
  local rc=0
  timeout "${POST_TIMEOUT:-545}" "$PYTHON" -m litespark_hf.efficiency.bench --suite post --config "${POST_CONFIG:-llama-1b}" \
    --modes "${POST_MODES:-sft_padded,sft_padding_free,sft_packing,sft_lora,dpo_full,dpo_lora}" \
    --variants "${POST_VARIANTS:-stock,liger,litespark}" --steps "${POST_STEPS:-14}" --time-from "${POST_TIME_FROM:-8}" \
    --out "$OUT_DIR" > "$OUT_DIR/post_bench.log" 2>&1 || rc=$?
  grep -E "^\| " "$OUT_DIR/post_bench.log" | tail -20
  return $rc
}

post_tests() {
  timeout 200 "$PYTHON" -m pytest -m gpu tests/gpu/test_checkpointing_gpu.py tests/gpu/test_lora_linear_gpu.py \
    tests/gpu/test_fsdp2_adamw_gpu.py tests/gpu/test_adamw_frozen_gpu.py tests/gpu/test_optim_gpu.py tests/gpu/test_sync_free_gpu.py \
    tests/gpu/test_fast_launch_gpu.py -q -rfE -p no:cacheprovider 2>&1 | tee "$OUT_DIR/post_gpu_tests.log" \
    | grep -E "passed|failed|FAILED|Error" | tail -8
}

launch_tests() {
  timeout 150 "$PYTHON" -m pytest -m gpu tests/gpu/test_fast_launch_gpu.py -q -rfE -p no:cacheprovider 2>&1 \
    | tee "$OUT_DIR/launch_gpu_tests.log" | grep -E "passed|failed|FAILED|Error|skipped" | tail -8
}

host_overhead() {
  local tag
  tag=$("$PYTHON" -c "from litespark_hf.efficiency.device import device_tag; print(device_tag())")
  timeout 200 "$PYTHON" benchmarks/bench_host_overhead.py --breakdown --out "$OUT_DIR/host_overhead_$tag.json" \
    2>&1 | tee "$OUT_DIR/host_overhead.log" | tail -40
}

fsdp2_pair() {  # the one-device and FSDP2 rows of each config in one call (#20's "kept" ratio)
  local rc=0 r engine dir
  local variants config steps
  for config in ${FSDP2_CONFIG:-llama-1b}; do
    steps=(--steps 12 --time-from 6)
    [ "$config" = llama-3b ] && steps=(--steps 10 --time-from 5)
    for r in $(seq "${FSDP2_REPEATS:-1}"); do
      for engine in ${FSDP2_ENGINES:-none fsdp2}; do
        dir=$OUT_DIR
        variants=${FSDP2_VARIANTS:-sdpa,litespark}
        # per engine: FSDP2_VARIANTS_FSDP2 / FSDP2_VARIANTS_ZERO3 (e.g. with litespark_no_prefetch, litespark_zero3_fine)
        [ "$engine" = fsdp2 ] && variants=${FSDP2_VARIANTS_FSDP2:-$variants}
        [ "$engine" = zero3 ] && variants=${FSDP2_VARIANTS_ZERO3:-$variants}
        if [ "$engine" = none ]; then  # llama-3b checkpoints: also every layer recomputed, as under FSDP2
          dir=$OUT_DIR/none variants=sdpa,litespark
          [ "$config" = llama-3b ] && variants=sdpa,litespark,litespark_checkpoint_all
          variants=${FSDP2_NONE_VARIANTS:-$variants}
        fi
        timeout 240 "$PYTHON" benchmarks/train_bench.py --config "$config" --engine "$engine" --variants "$variants" \
          "${steps[@]}" --out "$dir" --no-progress > "$OUT_DIR/bench_pair.tmp" 2>&1 || rc=$?
        cat "$OUT_DIR/bench_pair.tmp" >> "$OUT_DIR/bench_fsdp2_pair.log"
        grep -E "^\| (sdpa|litespark[a-z_]*) " "$OUT_DIR/bench_pair.tmp" | cut -d"|" -f2,4,6,10 \
          | sed "s/^/$config repeat $r $engine /"
      done
    done
  done
  rm -f "$OUT_DIR/bench_pair.tmp"
  if [ "${FSDP2_PROFILE:-0}" = 1 ]; then
    timeout 150 "$PYTHON" benchmarks/profile_step.py --config "$config" --engine fsdp2 --variants litespark \
      --out "$OUT_DIR" > "$OUT_DIR/profile_fsdp2.log" 2>&1 || rc=$?
    tail -30 "$OUT_DIR/profile_fsdp2.log"
  fi
  return $rc
}

post_profile() {  # the GPU tests of the post-training paths, and where the host-bound LoRA steps go
  local rc=0 m
  if [ "${POST_PROFILE_TESTS:-1}" != 0 ]; then
    timeout 100 "$PYTHON" -m pytest -m gpu tests/gpu/test_checkpointing_gpu.py tests/gpu/test_lora_linear_gpu.py -q \
      -rfE -p no:cacheprovider 2>&1 | tee "$OUT_DIR/post_gpu_tests.log" | grep -E "passed|failed|FAILED" | tail -6
  fi
  for m in ${POST_PROFILE_MODES:-dpo_lora sft_lora}; do  # torch.profiler (wall vs GPU-kernel time, top ops), then cProfile (Python)
    LITESPARK_POST_PROFILE="$OUT_DIR/profile_post_$m.txt" timeout 80 "$PYTHON" -m litespark_hf.efficiency.bench \
      --suite post --config llama-1b --modes $m --variants litespark --steps 12 --time-from 8 --no-energy \
      --tag profile --out /tmp/post_profile > /dev/null 2>&1 || rc=$?
    head -1 "$OUT_DIR/profile_post_$m.txt" 2>/dev/null
    LITESPARK_POST_CPROFILE="$OUT_DIR/cprofile_post_$m.prof" timeout 80 "$PYTHON" -m litespark_hf.efficiency.bench \
      --suite post --config llama-1b --modes $m --variants litespark --steps 12 --time-from 8 --no-energy \
      --tag profile --out /tmp/post_profile > /dev/null 2>&1 || rc=$?
    head -1 "$OUT_DIR/cprofile_post_$m.prof.txt" 2>/dev/null
  done
  return $rc
}

fp8_quality() {  # the same 1B pre-training run in bf16 and with float8 projections; loss curves compared
  local rc=0 v extra
  for v in bf16 fp8; do
    extra=()
    [ "$v" = fp8 ] && extra=(--fp8 true)
    timeout 170 accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/pretrain.py \
      --config recipes/configs/pretrain_llama_1b.yaml --use_litespark --max_steps "${FP8_STEPS:-300}" \
      --eval_steps 50 --logging_steps 10 --save_strategy no --track_efficiency false --disable_tqdm true \
      --corpus_max_train_chars 4000000 --corpus_max_eval_chars 100000 "${extra[@]}" \
      --output_dir "/tmp/pretrain_1b_$v" > "$OUT_DIR/pretrain_1b_$v.log" 2>&1 || rc=$?
    grep -E "\[pretrain\]|Error" "$OUT_DIR/pretrain_1b_$v.log" | tail -3 | sed "s/^/$v /"
  done
  "$PYTHON" benchmarks/fp8_quality.py --bf16-log "$OUT_DIR/pretrain_1b_bf16.log" \
    --fp8-log "$OUT_DIR/pretrain_1b_fp8.log" --logging-steps 10 --eval-steps 50 --out "$OUT_DIR" \
    > "$OUT_DIR/fp8_quality.log" 2>&1 || rc=$?
  tail -4 "$OUT_DIR/fp8_quality.log"
  return $rc
}

sat_bench() {  # SAT on Litespark (issue #19): pre-training and TRL SFT rows, time-boxed; the JSON survives a timeout
  local rc=0
  timeout "${SAT_TIMEOUT:-480}" "$PYTHON" benchmarks/bench_sat.py --modes "${SAT_MODES:-pretrain,sft}" --profile \
    ${SAT_ARGS:-} --out "$OUT_DIR" \
    > "$OUT_DIR/bench_sat.log" 2>&1 || rc=$?
  grep -E "^\[bench_sat\] |^\| |^targets:" "$OUT_DIR/bench_sat.log" | tail -40 || tail -30 "$OUT_DIR/bench_sat.log"
  return $rc
}

step device-info device_info
for c in "${CMDS[@]}"; do
  case "$c" in
    tests) step gpu-tests gpu_tests ;;
    kernels) step kernel-benchmarks kernel_benchmarks ;;
    recipes)
      step equivalence-tests equivalence_tests
      step pretrain-1b pretrain_1b
      step pretrain-tiny-fsdp2 pretrain_tiny_fsdp2 ;;
    train) step train-bench train_bench ;;
    fsdp2-probe) step fsdp2-probe fsdp2_probe ;;
    engines)
      step engines-check engines_check
      step engines-bench engines_bench ;;
    families)
      step families-gpu-tests families_gpu_tests
      step families-bench families_bench ;;
    sat) step sat-bench sat_bench ;;
    post) step post-bench post_bench ;;
    post-profile) step post-profile post_profile ;;
    post-tests) step post-tests post_tests ;;
    launch)
      step launch-tests launch_tests
      step host-overhead host_overhead ;;
    fsdp2) step fsdp2-pair fsdp2_pair ;;
    fp8)
      step fp8-tests fp8_tests
      step fp8-quality fp8_quality ;;
    verify)
      step verify-tests verify_tests
      step verify-bench verify_bench ;;
  esac
done
if (( ${#FAILED[@]} )); then
  echo "gpu_run.sh: failed steps: ${FAILED[*]} (logs in $OUT_DIR)"
  exit 1
fi
echo "gpu_run.sh: all steps passed (logs in $OUT_DIR)"
