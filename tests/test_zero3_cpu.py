"""DeepSpeed ZeRO-3 with Litespark (issue #20), 2 gloo processes on the CPU (DeepSpeed's CPU accelerator).

The worker is this file run as a script (``python -m torch.distributed.run --nproc_per_node 2 tests/test_zero3_cpu.py
OUT``): 4 steps (fp32, AdamW lr 1e-3) of a tiny Llama on a global batch of 4 x 33 tokens, from the same seeded
weights, three ways: the no-engine reference (stock ``sdpa``, unsharded, the full batch in one process), stock under
``deepspeed.initialize`` at ZeRO stage 3, and Litespark (`litespark_hf.apply`) under ZeRO-3, each rank on its half of
the batch. ``stage3_param_persistence_threshold: 0`` partitions every parameter (DeepSpeed's default keeps parameters
under 100k elements whole, which would be every weight of this model). transformers' ``HfDeepSpeedConfig`` is alive
when ``apply`` runs, as under the Trainer, so ``apply`` registers the fused modules' child weights itself
(`litespark_hf.sharding`). Recorded: the losses, what `fused_linear` and the fused cross-entropy received, and the
parameters' state between steps.

Measured on the 2-core CPU machine (torch 2.13, deepspeed 0.19.8): Litespark under ZeRO-3 equals stock under ZeRO-3
bit for bit; both equal the reference to 2e-7 relative for 3 steps and 1.3e-5 at step 4 (the same at world size 1:
DeepSpeed's optimizer steps on its flat fp32 partitions, and Adam magnifies the rounding of tiny gradients; the
existing FSDP2 tests see 1.5e-5 on the weights after one step). Tolerances: 1e-6 stock vs Litespark, 1e-4 against
the reference. The worker takes about 15 s.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN = 128, 64  # tests/tiny_models.py
GLOBAL_BATCH, SEQ, STEPS, LR = 4, 33, 4, 1e-3
TOL = 1e-6  # stock vs Litespark under the same engine
ENGINE_TOL = 1e-4  # ZeRO-3 vs no engine


# --------------------------------------------------------------------------------------------------------- worker
def _worker(out_dir: Path) -> None:
    warnings.simplefilter("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    import litespark_hf
    import litespark_kernels
    import litespark_kernels.ops.linear as lk_linear
    from litespark_hf.efficiency.engines import decline_deepspeed_shm_comm
    import litespark_hf.checkpointing as C
    from tiny_models import tiny_model

    planned = C.PLANNED_DEVICE_TYPES, C.device_memory
    seen = {"fused": 0, "fused_status": set(), "reference": 0, "flce": 0, "flce_weights": set()}
    fused_apply, reference, flce = lk_linear._FusedLinear.apply, lk_linear.fused_linear_reference, \
        litespark_kernels.fused_linear_cross_entropy

    def counted_apply(x, n, cast, *params):
        seen["fused"] += 1
        seen["fused_status"].update(getattr(p.ds_status, "name", "plain") for p in params if p is not None)
        return fused_apply(x, n, cast, *params)

    def counted_reference(x, weights, biases=None):
        seen["reference"] += 1
        return reference(x, weights, biases)

    def counted_flce(hidden, weight, *args, **kwargs):
        seen["flce"] += 1
        seen["flce_weights"].add(str(list(weight.shape)))
        return flce(hidden, weight, *args, **kwargs)

    lk_linear._FusedLinear.apply, lk_linear.fused_linear_reference = counted_apply, counted_reference
    litespark_kernels.fused_linear_cross_entropy = counted_flce  # modules/lm_head.py: lk.fused_linear_cross_entropy

    decline_deepspeed_shm_comm()
    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ), generator=g) for _ in range(STEPS)]
    rows = slice(rank * (GLOBAL_BATCH // world), (rank + 1) * (GLOBAL_BATCH // world))
    ds_config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    base = tiny_model("llama", seed=0, attn_implementation="sdpa")

    def reference_losses():
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        out = []
        for ids in data:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        return out

    def zero3_losses(litespark: bool, budget: int | None = None, units: bool = True) -> dict:
        """``budget``: transformers' checkpointing on and the planner's device faked with that many usable bytes;
        ``units``: LitesparkConfig.zero3_layer_units."""
        model = copy.deepcopy(base)
        keep = HfDeepSpeedConfig(ds_config)  # what the Trainer holds: transformers now knows ZeRO-3 is on
        res = {}
        if litespark:
            litespark_hf.apply(model, {"zero3_layer_units": units})
            res["registered"] = sum(len(m.__dict__.get("_litespark_zero3_external", ())) for m in model.modules())
            res["reported_units"] = litespark_hf.patching.swapped_counts(model).get("zero3_layer_units", 0)
        if budget is not None:
            total = int((budget + 1) / C.BUDGET_FRACTION) + 1
            C.PLANNED_DEVICE_TYPES, C.device_memory = ("cuda", "cpu"), lambda device: (total, 0, 0)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                          config=ds_config)
        # the modules DeepSpeed hooked (it numbers each one it registers hooks on) and the leaf layers
        res["hooked_modules"] = sum(hasattr(m, "ds_id") for m in model.modules())
        res["leaf_layers"] = sum(bool(getattr(m, "_z3_leaf", False)) for m in model.model.layers)
        res["hooked_in_layers"] = sum(hasattr(m, "ds_id") for layer in model.model.layers for m in layer.modules())
        res["modules_in_layers"] = sum(1 for layer in model.model.layers for _ in layer.modules())
        for k in seen:
            seen[k] = set() if isinstance(seen[k], set) else 0
        losses, between = [], set()
        for ids in data:
            loss = engine(input_ids=ids[rows], labels=ids[rows]).loss
            engine.backward(loss)
            engine.step()
            loss = loss.detach().clone()
            dist.all_reduce(loss)  # equal token counts per rank: the mean of the ranks' means is the global mean
            losses.append((loss / world).item())
            q = model.model.layers[0].self_attn.q_proj.weight
            between.add(f"{q.ds_status.name}:{q.numel()}")
        res.update(losses=losses, q_proj_between_steps=sorted(between),
                   seen={k: sorted(v) if isinstance(v, set) else v for k, v in seen.items()},
                   n_layers=len(model.model.layers))
        if budget is not None:
            planner = model.__dict__[C._STATE][0]
            res.update(placement=planner._placement(), recomputed=planner.recomputed, estimate=planner.estimate,
                       sizes=list(planner._sizes()), whole_numel=sum(p.ds_numel for p in model.parameters()),
                       flags=[bool(m.gradient_checkpointing) for m in model.model.layers])
            C.PLANNED_DEVICE_TYPES, C.device_memory = planned
        del keep
        return res

    def lora_losses(litespark: bool) -> dict:
        """PEFT LoRA on every projection (frozen embedding and base weights) under ZeRO-3, stock or Litespark."""
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)  # the adapters' initialisation
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        keep = HfDeepSpeedConfig(ds_config)
        if litespark:
            litespark_hf.apply(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-2),
                                          config=ds_config)
        losses = []
        for ids in data:
            loss = engine(input_ids=ids[rows], labels=ids[rows]).loss
            engine.backward(loss)
            engine.step()
            loss = loss.detach().clone()
            dist.all_reduce(loss)
            losses.append((loss / world).item())
        del keep
        layers = model.base_model.model.model.layers
        return {"losses": losses, "leaf": [bool(getattr(m, "_z3_leaf", False)) for m in layers]}

    def plan_checks() -> dict:
        """checkpoint_layers="auto" on ZeRO-3 partitions: every layer kept, exactly half recomputed, all."""
        n = base.config.num_hidden_layers
        tokens = (GLOBAL_BATCH // world) * SEQ
        per_token, boundary = C.activation_bytes_per_token(base.config), 4 * base.config.hidden_size
        weights = C.layer_weight_bytes(base.model.layers[-1])
        out = {"big": zero3_losses(True, 1 << 50), "weights": weights, "tokens": tokens, "n": n}
        if out["big"]["estimate"] is not None:
            fixed = out["big"]["estimate"] - C.activation_estimate(n, n, tokens, per_token, boundary, weights)
            out["base"] = fixed
            out["mid"] = zero3_losses(True, fixed + C.activation_estimate(n, n // 2, tokens, per_token, boundary,
                                                                          weights))
        out["small"] = zero3_losses(True, 1)
        return out

    results = {"world_size": world}
    for name, fn in (("reference", reference_losses), ("stock", lambda: zero3_losses(False)),
                     ("litespark", lambda: zero3_losses(True)),
                     ("litespark_fine", lambda: zero3_losses(True, units=False)),
                     ("lora_stock", lambda: lora_losses(False)), ("lora_litespark", lambda: lora_losses(True)),
                     ("plan", plan_checks)):
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # recorded for the test
            results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results[f"{name}_s"] = time.perf_counter() - t0
        dist.barrier()
    if rank == 0:
        (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------- tests
def test_fused_child_parameters_per_family():
    # what register_zero3_fused_weights hands DeepSpeed, without DeepSpeed: the children's weights (and biases) the
    # fused forwards read, on the fused module; the LM head's own weight is its own (gathered by its own hook)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import litespark_hf
    from litespark_hf.sharding import fused_child_parameters, maybe_register_zero3, zero3_enabled
    from tiny_models import tiny_model

    for family, per_layer in (("llama", 7), ("starcoder2", 8 + 4)):  # starcoder2: q/k/v/o and c_fc/c_proj biases
        model = tiny_model(family)
        litespark_hf.apply(model)
        found = fused_child_parameters(model)
        assert sum(len(ps) for _, ps in found) == per_layer * model.config.num_hidden_layers, family
        assert all(p is not model.lm_head.weight for _, ps in found for p in ps)
        kinds = {type(m).__name__ for m, _ in found}
        assert all(k.startswith("Litespark") for k in kinds), kinds
        assert not zero3_enabled(model) and maybe_register_zero3(model) == 0  # no ZeRO-3: nothing registered
    litespark_hf.restore(model)
    assert fused_child_parameters(model) == []


def _run(tmp_path_factory, nproc: int) -> dict:
    pytest.importorskip("deepspeed", reason="DeepSpeed is the optional extra: pip install -e '.[deepspeed]'")
    out = tmp_path_factory.mktemp(f"zero3_{nproc}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    env.pop("TRITON_INTERPRET", None)  # the kernels' CPU path is the PyTorch reference
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), __file__, str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == nproc
    return results


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    return _run(tmp_path_factory, 2)


@pytest.fixture(scope="module")
def zero3_one(tmp_path_factory):
    return _run(tmp_path_factory, 1)


def _ok(results, name):
    res = results[name]
    assert not isinstance(res, dict) or "error" not in res, res.get("traceback", res)
    return res


def _rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
def test_zero3_losses_equal_stock_and_the_unsharded_reference(zero3):
    ref, stock, ours = _ok(zero3, "reference"), _ok(zero3, "stock"), _ok(zero3, "litespark")
    assert len(ref) == STEPS
    assert _rel(stock["losses"], ref) <= ENGINE_TOL, (stock["losses"], ref)
    assert _rel(ours["losses"], ref) <= ENGINE_TOL, (ours["losses"], ref)
    assert _rel(ours["losses"], stock["losses"]) <= TOL, (ours["losses"], stock["losses"])


@pytest.mark.slow
def test_zero3_layer_units_hook_each_layer_once_with_equal_losses(zero3):
    # zero3_layer_units (default): each Litespark layer is a DeepSpeed leaf module, hooked itself, its children not
    stock, ours, fine = _ok(zero3, "stock"), _ok(zero3, "litespark"), _ok(zero3, "litespark_fine")
    n = ours["n_layers"]
    assert (ours["leaf_layers"], ours["hooked_in_layers"], ours["reported_units"]) == (n, n, n), ours
    assert fine["reported_units"] == 0
    assert fine["leaf_layers"] == stock["leaf_layers"] == 0
    # per-module hooks otherwise: a Llama layer, its attention, MLP, q/k/v/o, gate/up/down, activation, two norms
    assert fine["hooked_in_layers"] == stock["hooked_in_layers"] == stock["modules_in_layers"] == 13 * n
    assert ours["hooked_modules"] == stock["hooked_modules"] - 12 * n
    assert _rel(fine["losses"], stock["losses"]) <= TOL and _rel(ours["losses"], fine["losses"]) <= TOL
    assert fine["seen"]["fused_status"] == ["AVAILABLE"] and fine["seen"]["reference"] == 0


@pytest.mark.slow
def test_zero3_layer_units_with_lora_leave_the_first_layer_per_module(zero3):
    # frozen embedding: the first layer's input needs no gradient, so DeepSpeed's leaf backward hook would fire before
    # the layer's adapter gradients exist; that layer keeps per-module hooks, the ones after it are leaves
    stock, ours = _ok(zero3, "lora_stock"), _ok(zero3, "lora_litespark")
    assert stock["leaf"] == [False] * len(stock["leaf"])
    assert ours["leaf"] == [False] + [True] * (len(ours["leaf"]) - 1)
    assert _rel(ours["losses"], stock["losses"]) <= TOL, (ours, stock)
    assert stock["losses"][-1] != stock["losses"][0]  # the adapters trained


@pytest.mark.slow
def test_zero3_parameters_are_partitioned_between_steps(zero3):
    # world size 2: each rank keeps half; the module's own view is released (numel 0) outside its forward
    for name in ("stock", "litespark", "litespark_fine"):
        assert _ok(zero3, name)["q_proj_between_steps"] == ["NOT_AVAILABLE:0"]


@pytest.mark.slow
def test_zero3_fused_modules_get_their_gathered_weights(zero3):
    res = _ok(zero3, "litespark")
    n = res["n_layers"]
    assert res["registered"] == 7 * n  # q, k, v, o on the attention; gate, up, down on the MLP
    seen = res["seen"]
    # q/k/v, o, gate/up and down as fused GEMMs in every layer of every step, on weights ZeRO-3 had gathered
    assert seen["fused"] == STEPS * n * 4 and seen["reference"] == 0, seen
    assert seen["fused_status"] == ["AVAILABLE"], seen
    # the fused cross-entropy in the LM head's own forward, on the full [vocab, hidden] weight
    assert seen["flce"] == STEPS and seen["flce_weights"] == [f"[{VOCAB}, {HIDDEN}]"], seen


@pytest.mark.slow
def test_checkpoint_planner_on_zero3_partitions_at_one_process(zero3_one):
    import litespark_hf.checkpointing as C

    res = _ok(zero3_one, "plan")
    n, big, mid, small = res["n"], res["big"], res["mid"], res["small"]
    assert big["placement"] == mid["placement"] == small["placement"] == "sharded"
    assert (big["recomputed"], big["flags"]) == (0, [False] * n)
    assert (mid["recomputed"], mid["flags"]) == (n - n // 2, [i < n - n // 2 for i in range(n)])
    assert (small["recomputed"], small["flags"]) == (n, [True] * n)
    # the partitions' sizes (a partitioned parameter's own data is empty): fp32 gradients, the whole layer's copy
    grads, n_trainable, weights = big["sizes"]
    assert n_trainable == big["whole_numel"] > 0  # one process: the partitions are the whole parameters
    assert grads == 4 * n_trainable and weights == res["weights"] > 0
    logits = min(res["tokens"], 4096) * VOCAB * 8
    assert res["base"] == grads + 8 * n_trainable + logits + C.ENGINE_UNITS * weights + C.MARGIN_BYTES
    # the split does not change the values; every variant trains as the unchecked Litespark run
    assert _rel(mid["losses"], big["losses"]) <= TOL and _rel(small["losses"], big["losses"]) <= TOL
    assert _rel(big["losses"], _ok(zero3_one, "litespark")["losses"]) <= TOL


@pytest.mark.slow
def test_checkpoint_planner_keeps_the_users_checkpointing_under_zero3_with_two_processes(zero3):
    big = _ok(zero3, "plan")["big"]
    assert big["recomputed"] == big["n_layers"] and big["flags"] == [True] * big["n_layers"]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
