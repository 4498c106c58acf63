"""Continual pre-training with Sparsity-Accelerated Training through the recipe (CPU, ~40 s on 2 cores).

recipes/pretrain.py pre-trains a tiny Llama from scratch for a few steps, then continues from that directory
(``--model_name_or_path``, the model's own tokenizer) with ``--use_litespark --sat_omission_rate_mlp 0.5
--sat_omission_rate_heads 0.5``: the run must train (held-out loss falls), SAT must really have skipped work
(``executed_flops_fraction`` < 1 in efficiency.json, ``sat/`` keys in the logs) and the shape flags must be ignored.
Layers 0 and -1 are exempt from SAT by default, so the model has 4 layers (2 sparse ones).
"""

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import pretrain  # noqa: E402
from recipe_utils import RecipeError  # noqa: E402

SMALL = ["--logging_steps", "2", "--eval_steps", "100", "--save_strategy", "no", "--corpus_max_train_chars", "150000",
         "--corpus_max_eval_chars", "5000", "--max_length", "128", "--disable_tqdm", "true",
         "--dataloader_drop_last", "true"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_continual_pretraining_with_sat(tmp_path, capsys):
    base = tmp_path / "base"
    first = pretrain.main([*SMALL, "--max_steps", "6", "--hidden_size", "64", "--num_hidden_layers", "4",
                           "--intermediate_size", "128", "--learning_rate", "2e-3", "--eval_strategy", "no",
                           "--track_efficiency", "false", "--output_dir", str(base)])
    assert first["steps"] == 6 and first["start"] == "from scratch"
    capsys.readouterr()

    out = tmp_path / "cpt"
    r = pretrain.main([*SMALL, "--max_steps", "8", "--model_name_or_path", str(base), "--hidden_size", "999",
                       "--learning_rate", "1e-3", "--use_litespark", "--sat_omission_rate_mlp", "0.5",
                       "--sat_omission_rate_heads", "0.5", "--output_dir", str(out)])
    log = capsys.readouterr().out
    assert r["steps"] == 8 and r["start"] == str(base)
    # it trains, starting from the pre-trained weights (the shape flag --hidden_size 999 is ignored)
    assert r["params_M"] == first["params_M"]
    assert "ignored architecture flags: hidden_size=999" in log
    assert r["heldout_loss_after"] < r["heldout_loss_before"] - 0.05, r
    assert r["heldout_loss_before"] < 7.6  # the loaded model, not a fresh one (a fresh one starts at ~7.65 = ln 2048 + .)
    # SAT was active: scheduled rates and a reduced executed fraction in the logs, and in efficiency.json
    assert "'sat/omission_rate_mlp': '0.5'" in log and "'sat/omission_rate_heads': '0.5'" in log
    eff = json.loads((out / "efficiency.json").read_text())
    assert eff["training"]["executed_flops_fraction"] < 0.99, eff["training"]
    sparse_steps = [t["executed_flops_fraction"] for t in eff["timeline"] if "executed_flops_fraction" in t]
    assert sparse_steps and min(sparse_steps) < 0.97, sparse_steps
    # the saved model keeps the base shape and reloads
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["hidden_size"] == 64 and cfg["num_hidden_layers"] == 4
    assert json.loads((out / "results.json").read_text())["heldout_loss_after"] == pytest.approx(r["heldout_loss_after"])


def test_continual_pretraining_bad_start(tmp_path):
    """A model path that does not exist, or a model directory without a tokenizer: one clear error, nothing written."""
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match=r"model path .*no-such-model does not exist \(no such directory\)"):
        pretrain.main(["--model_name_or_path", str(tmp_path / "no-such-model"), "--output_dir", str(out)])
    assert not out.exists()

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "bare")
    with pytest.raises(RecipeError, match=r"holds no tokenizer; give --tokenizer_name_or_path"):
        pretrain.main(["--model_name_or_path", str(tmp_path / "bare"), "--output_dir", str(out)])
    assert not out.exists()
    # the embedded tokenizer (2048 tokens) does not fit a 300-token model
    with pytest.raises(RecipeError, match="tokenizer has 2048 tokens but model .* only 300 embeddings"):
        pretrain.main(["--model_name_or_path", str(tmp_path / "bare"), "--tokenizer_name_or_path", "embedded",
                       "--output_dir", str(out)])
    assert not out.exists() and os.path.isdir(tmp_path / "bare")
