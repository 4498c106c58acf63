"""FSDP2 (``fully_shard``, gloo on the CPU) with Litespark (issue #20): TRL's evaluate() after a sharded checkpoint,
and the fused projections / fused cross-entropy running on FSDP2's gathered weights. Worker: tests/fsdp2_cpu_worker.py
(its docstring says what each check does), launched with ``python -m torch.distributed.run`` as 2 processes (all
checks) and as 1 process (the layout accelerate uses with tied embeddings, and the evaluate() checks).

The evaluate() failure seen on the H100 ("aten.embedding.default got mixed torch.Tensor and DTensor", one process, with
and without --use_litespark): accelerate groups ``[norm, embed_tokens, lm_head]`` into one FSDP2 unit; TRL's fused LM
head reads ``lm_head.weight`` without calling ``lm_head``, so under torch 2.11 (the GPU machines) that group's forward
never completes and its "modules still to run" set stays non-empty; its pre-forward (the unshard) only fires on an empty
set, and only a backward empties it. An evaluation forward followed by a checkpoint save (the state-dict hook reshards
every unit) therefore leaves the next forward - the recipe's final ``trainer.evaluate()`` - with the sharded embedding.
pytorch/pytorch#180428 (in torch 2.13) fixed the group hooks; litespark_hf's trainers clear the stale set at the root's
pre-forward (`litespark_hf.trainer._clear_stale_fsdp_groups`), for any torch. The worker reproduces the older hooks on
torch 2.13 (`fsdp2_cpu_worker._old_group_hooks`).

`LitesparkAdamW` on FSDP2's sharded DTensor weights (issue #20): the same update as torch's AdamW on every shard
(empty shards included), DTensor moments, a sharded optimizer state that round-trips through
torch.distributed.checkpoint, frozen masks cut to the shards, and the Trainer's swap under accelerate's FSDP2
preparation (on the CPU only with "cpu" allowed for it; the GPU test is tests/gpu/test_fsdp2_adamw_gpu.py).

Measured on the 2-core CPU machine (torch 2.13, transformers 5.23, trl 1.16, accelerate 1.15): 5-step fp32 losses of
stock and Litespark under FSDP2 equal the unsharded reference to <= 1e-7 relative in every layout; the 2-process
worker takes about 45 s, the 1-process one about 20 s.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about 65 s on 2 CPU cores

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 128, 64  # tests/tiny_models.py
TOL = 1e-5
ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
LAYOUTS = ("layers", "accelerate", "accelerate_tied", "root")
ONE_PROCESS = ("train_accelerate_tied", "trainer_stock_old_hooks", "trainer_ours_old_hooks",
               "trainer_litespark_old_hooks", "optim_adamw", "trainer_litespark", "trainer_litespark_adamw", "checkpoint_plan")
ERROR = "aten.embedding.default got mixed torch.Tensor and DTensor"


def _run(tmp_path_factory, nproc: int, checks=None) -> dict:
    out = tmp_path_factory.mktemp(f"fsdp2_{nproc}")
    env = {**os.environ, **ENV}
    env.pop("TRITON_INTERPRET", None)  # the kernels' CPU path is the PyTorch reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / "fsdp2_cpu_worker.py"), str(out)] + ([",".join(checks)] if checks else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == nproc
    return results


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _run(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    return _run(tmp_path_factory, 1, ONE_PROCESS)


@pytest.fixture(params=[1, 2], ids=["1proc", "2proc"])
def world(request):
    return request.getfixturevalue({1: "one", 2: "two"}[request.param])


def _ok(results, name):
    res = results[name]
    assert "error" not in res, res.get("traceback", res)
    return res


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def _torch_fixed_group_hooks() -> bool:
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    return hasattr(FSDPState, "_force_complete_incomplete_states")


# ----------------------------------------------------------------------------------------------- evaluate()
def test_stock_trl_evaluate_fails_under_torch_2_11_group_hooks(world):
    # The H100 failure, reproduced: training and the step-2 evaluation + sharded checkpoint ran, the next
    # evaluate() met the sharded embedding weight.
    res = world["trainer_stock_old_hooks"]
    assert res["fsdp2"] and res["trainer"] == "trl.trainer.sft_trainer.SFTTrainer"
    assert ERROR in res.get("error", ""), res
    assert res["failed_in"] == "evaluate" and len(res["train_losses"]) == 2
    assert "pytorch_model_fsdp_0" in res["checkpoint"]


@pytest.mark.parametrize("name", ["trainer_litespark_old_hooks", "trainer_ours_old_hooks"])
def test_litespark_trainers_evaluate_after_checkpoint_under_torch_2_11_group_hooks(world, name):
    res = _ok(world, name)
    assert res["fsdp2"] and res["trainer"] == "litespark_hf.trainer.SFTTrainer"
    assert res["wrapped"] == "FSDPLlamaForCausalLM"
    # nothing trained between the step-2 evaluation and evaluate(): the same loss
    assert abs(res["eval_loss"] - res["eval_loss_step2"]) <= TOL * res["eval_loss_step2"]
    assert res["embed_weight_after"] == "Parameter"  # the group was unsharded for the forward again


def test_evaluate_with_this_torch(two):
    stock, ours = two["trainer_stock"], _ok(two, "trainer_litespark")
    if _torch_fixed_group_hooks():  # torch with pytorch/pytorch#180428: the stock trainer works too
        _ok(two, "trainer_stock")
    else:
        assert ERROR in stock.get("error", ""), stock
    assert ours["eval_loss"] == pytest.approx(ours["eval_loss_step2"], rel=TOL)


def test_trainer_losses_stock_vs_litespark_under_fsdp2(two):
    # TRL's fused LM head computes the loss in every variant; Litespark's layers must not change it
    runs = [_ok(two, n) for n in ("trainer_ours_old_hooks", "trainer_litespark_old_hooks", "trainer_litespark")]
    if _torch_fixed_group_hooks():
        runs.append(_ok(two, "trainer_stock"))
    first = runs[0]
    for res in runs[1:]:
        assert _rel(res["train_losses"], first["train_losses"]) <= TOL, (res, first)
        assert res["eval_loss"] == pytest.approx(first["eval_loss"], rel=TOL)
    stock_failed = two["trainer_stock_old_hooks"]  # trained fine before failing in evaluate()
    assert _rel(stock_failed["train_losses"], first["train_losses"]) <= TOL
    # fsdp2_forward_prefetch with use_litespark only: litespark_hf.SFTTrainer without it keeps FSDP2's default
    n = len(first["forward_prefetch"])
    assert first["forward_prefetch"] == [0] * n, first
    assert _ok(two, "trainer_litespark")["forward_prefetch"] == [1] * (n - 1) + [0]


# -------------------------------------------------------------------------------------- fused paths under FSDP2
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_training_equals_the_unsharded_reference(two, layout):
    res = _ok(two, f"train_{layout}")
    ref = res["reference"]
    assert len(ref) == 5
    assert _rel(res["stock"], ref) <= TOL, res
    assert _rel(res["litespark"], ref) <= TOL, res
    assert _rel(res["litespark"], res["stock"]) <= TOL, res


def test_fsdp2_one_process_accelerate_layout(one):
    res = _ok(one, "train_accelerate_tied")
    assert _rel(res["litespark"], res["reference"]) <= TOL and _rel(res["stock"], res["reference"]) <= TOL, res
    assert res["seen"]["fused_linear"] == 5 * res["n_layers"] * 4 and res["seen"]["reference"] == 0


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_fused_projections_and_loss_use_the_gathered_weights(two, layout):
    res = _ok(two, f"train_{layout}")
    seen = res["seen"]
    # Inside each unit's forward FSDP2 has registered the gathered (plain nn.Parameter) weights: q/k/v, o, gate/up
    # and down ran as fused GEMMs in every layer of every step, the reference (the DTensor fallback) never ran.
    assert seen["fused_linear"] == 5 * res["n_layers"] * 4, seen
    assert seen["fused_linear_weights"] == ["Parameter"] and seen["reference"] == 0, seen
    # the fused cross-entropy, inside LitesparkLMHead.forward, on the full [vocab, hidden] weight, once per step
    assert seen["flce"] == 5 and seen["flce_weights"] == [f"Parameter[{VOCAB}, {HIDDEN}]"], seen
    assert res["sharded_outside_forward"] == ["DTensor"]  # sharded again between the forwards


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fsdp2_one_buffer_cast(two, layout):
    res = _ok(two, f"train_{layout}")
    assert res["casts_unsharded"] == 1  # the control: one cast for the whole model per autocast forward
    # At the root's forward the per-layer units are still sharded: no whole-model cast (each fused GEMM casts its
    # own gathered weights). With the root as the only unit every weight is gathered for the whole forward and
    # backward, so the one-buffer cast of that forward is valid (and no more memory than autocast's own casts).
    assert res["casts_sharded"] == (1 if layout == "root" else 0), res


# ------------------------------------------------------------------------------------- LitesparkAdamW under FSDP2
ADAMW_TOL = 1e-6
OPTIM_LAYOUTS = ("layers", "accelerate", "accelerate_tied", "root")


def test_litespark_adamw_on_sharded_weights_equals_torch_adamw(world):
    res = _ok(world, "optim_adamw")
    for layout in OPTIM_LAYOUTS if world["world_size"] == 2 else ("accelerate_tied",):
        r = res[layout]
        # 3 steps on the same gradients: full weights and both moments as torch.optim.AdamW(foreach=False)'s
        assert max(r["max_rel"].values()) <= ADAMW_TOL, (layout, r)
        assert r["steps"] == [3.0] and r["step_types"] == r["ref_step_types"] == ["Tensor/torch.float32/cpu"], r
        assert r["moments_like_params"], r  # DTensor moments with the weight's mesh and placements
        # the probe head's [1, 64] weight and [1] bias: nothing on the second process
        assert r["empty_local_shards"] == (2 if world["world_size"] == 2 else 0), r


def test_litespark_adamw_frozen_masks_cut_to_the_shards(two):
    res = _ok(two, "optim_frozen")
    for name in ("gate_proj", "down_proj"):  # rows frozen (the sharded dimension), columns frozen
        r = res[name]
        assert r["sharded_dim"] == [0] and r["n_frozen"] > 0, r
        assert r["frozen_unchanged"], r  # weight and both moments, bit for bit
        assert r["kept_max_rel"] <= ADAMW_TOL, r


def test_litespark_adamw_sharded_state_dict_round_trip(two):
    res = _ok(two, "optim_state_dict")
    assert "DTensor" in res["saved_types"]  # the moments, saved sharded; the step a plain tensor
    assert res["litespark_loaded_steps"] == [3.0] and res["litespark_resumed_steps"] == [4.0]
    # a fresh LitesparkAdamW loaded from the sharded state then stepping = continuing (the same arithmetic: exact)
    assert max(res["litespark_resumed_vs_continued"].values()) == 0.0, res
    # torch's AdamW takes the same state dict
    assert res["torch_loaded_steps"] == [3.0] and res["torch_resumed_steps"] == [4.0]
    assert max(res["torch_resumed_vs_continued"].values()) <= ADAMW_TOL, res


def test_trainer_swaps_in_litespark_adamw_under_accelerate_fsdp2(world):
    ours, stock_opt = _ok(world, "trainer_litespark_adamw"), _ok(world, "trainer_litespark")
    assert ours["fsdp2"] and ours["optimizer"] == "LitesparkAdamW"
    assert stock_opt["optimizer"] == "AdamW"  # without "cpu" allowed the CPU run keeps torch's (the kernel is CUDA)
    # created before accelerate's prepare, re-pointed at the sharded weights by it; sharded state, saved by DCP
    assert ours["optimizer_params"] == ["DTensor"] and ours["optimizer_state"] == ["DTensor"]
    assert ours["n_optimizer_params"] == ours["n_model_params"]
    assert ".metadata" in ours["checkpoint_optimizer"]
    assert _rel(ours["train_losses"], stock_opt["train_losses"]) <= TOL
    assert ours["eval_loss"] == pytest.approx(stock_opt["eval_loss"], rel=TOL)
    # fsdp2_forward_prefetch: every Litespark layer's unit but the last prefetches the next one
    n = len(ours["forward_prefetch"])
    assert n > 1 and ours["forward_prefetch"] == stock_opt["forward_prefetch"] == [1] * (n - 1) + [0], ours
    # the clip folded into LitesparkAdamW's step: its norm (local shards + one all-reduce) is the one the stock clip
    # (torch.optim.AdamW, accelerate's DTensor clip_grad_norm_) logs, at every step; and it clips (norm > max 1.0)
    assert len(ours["folded_clip_norms"]) == 2 and None not in ours["folded_clip_norms"], ours
    assert stock_opt["folded_clip_norms"] == [], stock_opt
    assert _rel(ours["folded_clip_norms"], ours["grad_norms"]) <= TOL
    assert _rel(ours["grad_norms"], stock_opt["grad_norms"]) <= TOL
    assert min(stock_opt["grad_norms"]) > 1.0, stock_opt["grad_norms"]


# ------------------------------------------------------------------------------- checkpoint_layers="auto" under FSDP2
def test_checkpoint_planner_on_fsdp2_shards_at_one_process(one):
    import litespark_hf.checkpointing as C

    res = _ok(one, "checkpoint_plan")
    big, mid, small = res["big"], res["mid"], res["small"]
    assert big["placement"] == mid["placement"] == small["placement"] == "sharded"
    # the memory decides: everything kept, exactly the first two recomputed, the user's checkpointing
    assert (big["recomputed"], big["flags"]) == (0, [False] * 4)
    assert (mid["recomputed"], mid["flags"]) == (2, [True, True, False, False])
    assert (small["recomputed"], small["flags"]) == (4, [True] * 4)
    # what it reckoned with: the local shards' fp32 gradients and AdamW states to come, a logits chunk, the gathered
    # units (ENGINE_UNITS layer weight copies) and the margin (the fake device's allocation is 0)
    grads, n_trainable, weights = big["sizes"]
    assert grads == 4 * n_trainable and weights == res["weights"]
    logits = min(res["tokens"], 4096) * VOCAB * 8
    assert res["base"] == grads + 8 * n_trainable + logits + C.ENGINE_UNITS * weights + C.MARGIN_BYTES
    # values do not depend on the split
    assert mid["losses"] == big["losses"] == small["losses"]
    assert res["mid_weight_diff"] == 0.0 and res["small_weight_diff"] == 0.0


def test_checkpoint_planner_keeps_the_users_checkpointing_with_two_processes(two):
    res = _ok(two, "checkpoint_plan")
    # each rank would plan on its own batch: the user's checkpointing stays, even with room for every layer
    assert res["big"]["recomputed"] == 4 and res["big"]["flags"] == [True] * 4
    assert res["big"]["losses"] == res["small"]["losses"]
