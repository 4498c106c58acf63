"""`accelerate launch --cpu --num_processes 2` (gloo) runs pretrain.py, and its losses match a 1-process run at the
same global batch (2 x 2 rows against 1 x 4 rows, the same data order).

Tolerance: 5e-2 absolute on the mean training loss and the final held-out loss (6 steps from ~7.6). Measured on
2 CPU cores: train loss 7.5819 (1 process) vs 7.6100 (2 processes), held-out loss before training 7.6449 vs 7.6430.
OPEN: the gap (0.028) is larger than float reordering explains; suspected causes are the order in which the
packed rows reach the two processes and the held-out loss being a mean of per-process batch means. Tighten the
tolerance once the data order is shown to be identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max_steps", "6", "--logging_steps", "1", "--eval_steps", "100", "--save_strategy", "no",
        "--corpus_max_train_chars", "150000", "--corpus_max_eval_chars", "10000", "--max_length", "128",
        "--hidden_size", "64", "--num_hidden_layers", "2", "--intermediate_size", "128", "--disable_tqdm", "true",
        "--learning_rate", "1e-3", "--dataloader_drop_last", "true"]


def _run(cmd, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd + ["--output_dir", str(out)], capture_output=True, text=True, timeout=400, env=env,
                       cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    state = json.loads((out / "results.json").read_text())
    logs = [json.loads(l) for l in (out / "losses.jsonl").read_text().splitlines()] if (
        out / "losses.jsonl").exists() else None
    return state, logs


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no"]
    one, _ = _run(launch + ["--num_processes", "1", "recipes/pretrain.py", *ARGS,
                            "--per_device_train_batch_size", "4"], tmp_path / "one")
    two, _ = _run(launch + ["--num_processes", "2", "recipes/pretrain.py", *ARGS,
                            "--per_device_train_batch_size", "2"], tmp_path / "two")
    assert two["steps"] == one["steps"] == 6
    assert two["heldout_loss_after"] < two["heldout_loss_before"]  # it trains
    assert abs(two["train_loss"] - one["train_loss"]) < 5e-2, (one, two)
    assert abs(two["heldout_loss_after"] - one["heldout_loss_after"]) < 5e-2, (one, two)
