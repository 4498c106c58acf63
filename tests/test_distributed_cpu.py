"""Scale-out checks that run on CPUs: FSDP2 (``fully_shard`` on a gloo CPU mesh) with Litespark's fused LM head, a
sharded model's checkpoint reloaded by plain ``from_pretrained``, and the SFT / DPO recipes as 2 processes.

All launched as 2 processes with ``python -m torch.distributed.run --nproc_per_node 2`` (``accelerate launch --cpu
--num_processes 2`` starts a single process). On CPU the Litespark kernels run their PyTorch references, but the
module swapping and FSDP2's parameter gathering around the LM head's forward are the same as on GPU.

FSDP2 checks (tests/distributed_cpu_worker.py; tiny Llama, fp32, global batch 4 x 33 tokens split 2 + 2 over the
ranks, compared with an unsharded stock ``sdpa`` model run on the full batch in the same process). Measured on the
2-core CPU machine (torch 2.13, transformers 5.23): loss relative error 0 to 1e-7, every parameter's full gradient
<= 2.2e-7, logits after one AdamW step (lr 1e-2) 3e-7, weights after that step 1.5e-5 (Adam divides tiny gradients
by their own magnitude, which magnifies summation-order noise on near-zero entries); checkpoint logits equal exactly.
Tolerances: 1e-5 for loss, gradients and logits, 1e-4 for the weights after the Adam step.
The worker takes about 15 s, the SFT + DPO recipe runs about 30 s.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 128, 64  # tests/tiny_models.py
TOL = 1e-5
ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def _torchrun(args, timeout=300):
    env = {**os.environ, **ENV}
    env.pop("TRITON_INTERPRET", None)  # the kernels' CPU path is the PyTorch reference; the interpreter is not needed
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    _torchrun([str(ROOT / "tests" / "distributed_cpu_worker.py"), str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    return results


def _ok(results, name):
    res = results[name]
    assert "error" not in res, res.get("traceback", res)
    return res


def _assert_matches_stock(res, n_params):
    assert res["n_params"] == res["n_ref_params"] == n_params
    assert res["loss_rel"] <= TOL, res
    bad = {k: v for k, v in res["grad_rel"].items() if not v <= TOL}
    assert not bad, bad
    # The fused cross-entropy ran (no logits) inside the LM head's forward, on the gathered full weight, while the
    # parameter itself stays sharded (half the vocabulary rows per rank) outside the forward.
    seen = res["head_weight_seen"]  # FSDP2 registers the unsharded weight as a plain nn.Parameter
    assert len(seen) == 1 and seen[0][0] in ("Parameter", "Tensor") and seen[0][1] == [VOCAB, HIDDEN], seen
    assert res["head_weight_local_shape"] == [VOCAB // 2, HIDDEN]


def test_fsdp2_untied_loss_grads_and_step_match_stock(fsdp):
    res = _ok(fsdp, "untied")  # layers + lm_head + root wrapped
    _assert_matches_stock(res, n_params=21)
    assert res["weight_changed"] > 0.1  # the step really moved the weights
    assert res["weight_rel_max"] <= 1e-4, res
    assert res["logits_rel_after_step"] <= TOL, res


def test_fsdp2_token_averaged_loss_with_ignored_labels(fsdp):
    # Uneven -100 counts per rank; num_items_in_batch = global count and loss x world size (the Trainer's recipe).
    _assert_matches_stock(_ok(fsdp, "untied_num_items"), n_params=21)


@pytest.mark.parametrize("name", ["tied", "tied_grouped"])
def test_fsdp2_tied_embeddings(fsdp, name):
    # "tied": only the root wrapped; "tied_grouped": layers wrapped and fully_shard([embed_tokens, lm_head]).
    res = _ok(fsdp, name)
    _assert_matches_stock(res, n_params=20)
    assert res["weight_rel_max"] <= 1e-4, res
    assert res["logits_rel_after_step"] <= TOL, res


def test_fsdp2_tied_lm_head_alone_is_rejected_by_fsdp(fsdp):
    # Known FSDP2 limitation, recorded so a change is noticed: a tied lm_head cannot be its own FSDP unit
    # (use fully_shard([embed_tokens, lm_head]) as in "tied_grouped", or leave it to the root).
    res = fsdp["tied_lm_head_wrapped"]
    if "error" not in res:
        pytest.fail(f"FSDP2 now accepts a separately wrapped tied lm_head: {res}; turn this into an equality test")
    assert "shared with a parameter already managed by another FSDP group" in res["error"]


def test_fsdp2_full_state_dict_reloads_with_from_pretrained(fsdp):
    res = _ok(fsdp, "checkpoint")
    assert res["n_keys"] == 21
    assert "model.safetensors" in res["files"] and "config.json" in res["files"]
    assert res["plain_class"] == "LlamaForCausalLM"  # a stock class, nothing of Litespark in the checkpoint
    assert res["trained"] > 0.1  # the saved weights are the trained ones, not the seeded initial ones
    assert res["logits_rel"] <= TOL, res


def _epoch(stdout_err: str) -> float:
    return float(re.findall(r"'epoch': '([0-9.]+)'", stdout_err)[-1])


@pytest.mark.slow
def test_sft_then_dpo_recipes_train_as_two_processes(tmp_path):
    common = ["--use_litespark", "true", "--max_steps", "3", "--per_device_train_batch_size", "2",
              "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--disable_tqdm", "true",
              "--track_efficiency", "false"]
    sft = _torchrun(["recipes/sft.py", "--output_dir", str(tmp_path / "sft"), "--start_from", str(tmp_path / "none"),
                     "--sft_num_train", "64", "--sft_num_eval", "8", "--exact_match_samples", "4",
                     "--exact_match_max_new_tokens", "2", *common])
    dpo = _torchrun(["recipes/dpo.py", "--output_dir", str(tmp_path / "dpo"), "--model_name_or_path",
                     str(tmp_path / "sft"), "--dpo_num_train", "32", "--dpo_num_eval", "8",
                     "--preference_eval_samples", "4", "--max_length", "64", *common])
    for r, n_train in ((sft, 64), (dpo, 32)):
        log = r.stdout + r.stderr
        assert "litespark: rope uses the PyTorch reference" in log  # the Litespark layers ran
        assert _epoch(log) == pytest.approx(3 * 2 * 2 / n_train)  # 3 steps x 2 rows x 2 processes
    for stage in ("sft", "dpo"):
        out = tmp_path / stage
        for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "results.json"):
            assert (out / name).is_file(), f"{stage} did not write {name}"
        results = json.loads((out / "results.json").read_text())
        assert results["steps"] == 3
        assert results["train_loss"] > 0
    assert json.loads((tmp_path / "dpo" / "results.json").read_text())["start"] == str(tmp_path / "sft")
