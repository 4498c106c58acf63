"""Two CPU processes (torch.distributed, gloo) run pretrain.py and match a 1-process run at the same global batch
(2 x 2 rows against 1 x 4 rows, the same data order and the same seeded initial weights).

Launched with ``python -m torch.distributed.run --nproc_per_node N`` (``accelerate launch --cpu --num_processes 2``
starts a single process). Tolerances, from a measured run: every logged step loss equal to 1e-4 (they printed
identical to 4 digits), the mean training loss to 1e-5, and the final weights to a relative error of 1e-5 (measured
4.4e-8: only the order of the gradient sums differs). Held-out losses are not compared tightly: the distributed
evaluation averages per-process batch means over a padded split (measured difference 5e-3), so only "it trains"
is asserted on them.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--max_steps", "6", "--logging_steps", "1", "--eval_steps", "100", "--save_strategy", "no",
        "--corpus_max_train_chars", "150000", "--corpus_max_eval_chars", "10000", "--max_length", "128",
        "--hidden_size", "64", "--num_hidden_layers", "2", "--intermediate_size", "128", "--disable_tqdm", "true",
        "--learning_rate", "1e-3", "--dataloader_drop_last", "true", "--track_efficiency", "false"]


def _run(nproc: int, per_device: int, out: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "recipes/pretrain.py",
           *ARGS, "--per_device_train_batch_size", str(per_device), "--output_dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    step_losses = [float(ast.literal_eval(m)["loss"]) for m in re.findall(r"\{'loss'[^}]*\}", r.stdout + r.stderr)]
    from safetensors.torch import load_file

    return json.loads((out / "results.json").read_text()), step_losses, load_file(str(out / "model.safetensors"))


@pytest.mark.slow
def test_two_cpu_processes_match_one(tmp_path):
    one, losses_one, w_one = _run(1, 4, tmp_path / "one")
    two, losses_two, w_two = _run(2, 2, tmp_path / "two")
    assert two["steps"] == one["steps"] == 6
    assert len(losses_one) == len(losses_two) == 6
    for a, b in zip(losses_one, losses_two):
        assert abs(a - b) <= 1e-4, (losses_one, losses_two)
    assert abs(two["train_loss"] - one["train_loss"]) <= 1e-5
    for name, t in w_one.items():
        assert ((t - w_two[name]).norm() / t.norm()).item() <= 1e-5, name
    assert two["heldout_loss_after"] < two["heldout_loss_before"]  # it trains
    assert losses_two[-1] < losses_two[0]
