#!/usr/bin/env bash
# One entry point that does all the set-up on a fresh machine, then runs a job.
#   bash run.sh demo   # the main job: the embedded default chain (pre-train -> SFT -> DPO), offline
#   bash run.sh test   # the test suite (CPU; GPU tests are skipped without CUDA)
# The environment lives in .venv (created on first use; it sees the system's packages, so an existing CUDA
# build of torch is reused). Set LITESPARK_VENV to use another path.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${LITESPARK_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
# The test job also takes the deepspeed extra: the ZeRO-3 tests run on DeepSpeed's CPU accelerator (pure Python, no
# ops built); the demo does not need it.
EXTRAS=dev NEEDS="import litespark_hf, pytest"
if [ "${1:-}" = test ]; then EXTRAS=dev,deepspeed NEEDS="$NEEDS; import deepspeed"; fi
if ! DS_ACCELERATOR=cpu "$PY" -c "$NEEDS" >/dev/null 2>&1; then
  "$PY" -m pip install -q --upgrade pip >/dev/null
  # torch first: 2.13.0 is a local CPU wheel on the project's CPU machines; elsewhere pip takes the index build.
  "$PY" -c "import torch" >/dev/null 2>&1 || "$PY" -m pip install -q "torch==2.13.0"
  DS_BUILD_OPS=0 "$PY" -m pip install -q -e ".[$EXTRAS]"
fi
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
case "${1:-}" in
  demo) shift; exec "$PY" recipes/chain.py "$@" ;;
  test) shift; exec "$PY" -m pytest -q "$@" ;;
  *) echo "usage: bash run.sh demo|test [args...]" >&2; exit 2 ;;
esac
