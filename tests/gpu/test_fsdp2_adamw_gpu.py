"""`LitesparkAdamW` on FSDP2's sharded DTensor weights on the GPU (issue #20): the Triton kernel on the local
shards against torch's AdamW, the sharded state through torch.distributed.checkpoint, and the Trainer's swap under
accelerate's FSDP2 preparation. One process: NCCL at world size 1, initialised from environment variables (the CPU
tests, tests/test_fsdp2_cpu.py, cover world size 2 with gloo and the reference update).
"""

import os

import pytest
import torch

from litespark_hf import LitesparkAdamW
from tiny_models import tiny_model, tiny_tokenizer, VOCAB

pytestmark = pytest.mark.gpu

LR = 1e-3


@pytest.fixture(scope="module")
def mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29533"), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    torch.cuda.set_device(0)
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
    yield init_device_mesh("cuda", (1,))
    if made:
        dist.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _sharded(mesh):
    from torch.distributed.fsdp import fully_shard

    model = tiny_model("llama", seed=0, attn_implementation="sdpa").cuda()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _groups(model):
    named = list(model.named_parameters())
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


@torch.no_grad()
def _full(model, opt):  # copies: at world size 1 full_tensor() is a view of the shard, which the tests overwrite
    out = {}
    for n, p in model.named_parameters():
        out[n] = p.full_tensor().clone()
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{n}.{k}"] = opt.state[p][k].full_tensor().clone()
    return out


def _max_rel(a, b):
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)).item() for k in a)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (2, 64), generator=g).cuda() for _ in range(n)]


def test_kernel_steps_the_local_shards_like_torch_adamw(mesh):
    model, ref = _sharded(mesh), _sharded(mesh)
    opt = LitesparkAdamW(_groups(model), lr=LR, betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(_groups(ref), lr=LR, betas=(0.9, 0.95), foreach=False)
    for ids in _batches(3):
        model(input_ids=ids, labels=ids).loss.backward()
        for p, q in zip(model.parameters(), ref.parameters()):
            q.grad = p.grad.clone()  # the same gradients: the comparison measures the update only
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    assert any(c.get("table") is not None for c in opt._caches.values())  # the Triton kernel ran, not the reference
    assert _max_rel(_full(model, opt), _full(ref, ref_opt)) <= 1e-5
    for p in model.parameters():
        st = opt.state[p]
        assert type(st["exp_avg"]).__name__ == "DTensor" and st["exp_avg"].placements == p.placements
        assert st["step"].device.type == "cpu" and st["step"].item() == 3.0


def test_sharded_state_dict_round_trip(mesh):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.utils._pytree import tree_map

    model = _sharded(mesh)
    opt = LitesparkAdamW(_groups(model), lr=LR)
    data = _batches(4, seed=2)

    def step(o, ids):
        model(input_ids=ids, labels=ids).loss.backward()
        o.step()
        o.zero_grad(set_to_none=True)

    for ids in data[:3]:
        step(opt, ids)
    saved = tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, get_optimizer_state_dict(model, opt))
    weights = [p.to_local().clone() for p in model.parameters()]
    step(opt, data[3])
    cont = _full(model, opt)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.to_local().copy_(w)
    fresh = LitesparkAdamW(_groups(model), lr=LR)
    set_optimizer_state_dict(model, fresh, saved)
    step(fresh, data[3])
    assert _max_rel(_full(model, fresh), cont) == 0.0


def test_trainer_swaps_in_litespark_adamw_under_accelerate_fsdp2(mesh, tmp_path, monkeypatch):
    """litespark_hf's SFTTrainer under accelerate's FSDP2 (the environment of accelerate_configs/fsdp2.yaml): the
    optimizer is LitesparkAdamW on the sharded weights, and training matches the same run with torch's AdamW."""
    from accelerate.state import AcceleratorState
    from datasets import Dataset

    import litespark_hf

    for k, v in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                 "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer", "FSDP_RESHARD_AFTER_FORWARD": "true",
                 "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT", "FSDP_OFFLOAD_PARAMS": "false"}.items():
        monkeypatch.setenv(k, v)
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(f"t{int(i)}" for i in torch.randint(4, VOCAB, (30,), generator=g))} for _ in range(32)]
    runs = {}
    for fused in (True, False):
        AcceleratorState._reset_state()
        args = litespark_hf.SFTConfig(
            output_dir=str(tmp_path / f"fused_{fused}"), max_steps=4, per_device_train_batch_size=2,
            learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=4,
            report_to=[], max_length=32, disable_tqdm=True, packing=True, seed=0, bf16=True,
            use_litespark=True, litespark_config=f'{{"fused_optimizer": {str(fused).lower()}}}')
        trainer = litespark_hf.SFTTrainer(model=tiny_model("llama", seed=0, attn_implementation="sdpa"), args=args,
                                          train_dataset=Dataset.from_list(rows), processing_class=tiny_tokenizer())
        assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
        trainer.train()
        opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        runs[fused] = (type(opt).__name__, [h["loss"] for h in trainer.state.log_history if "loss" in h], opt)
    name, losses, opt = runs[True]
    assert name == "LitesparkAdamW" and runs[False][0] == "AdamW"
    assert {type(p).__name__ for grp in opt.param_groups for p in grp["params"]} == {"DTensor"}
    assert opt.shadow is None
    assert any(c.get("table") is not None for c in opt._caches.values())  # the kernel stepped the shards
    assert (tmp_path / "fused_True" / "checkpoint-4" / "optimizer_0" / ".metadata").is_file()
    assert losses == pytest.approx(runs[False][1], rel=1e-3)


def test_checkpoint_planner_under_fsdp2(mesh):
    """``checkpoint_layers="auto"`` on FSDP2's sharded weights at world size 1 (issue #20): a 6-layer 1024-wide
    Llama in accelerate's layout with transformers' checkpointing on; "auto" keeps layers unchecked on this GPU,
    the step's peak memory stays under the planner's estimate, and 3 AdamW steps match "all" within bf16
    tolerance."""
    import copy

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoConfig, AutoModelForCausalLM

    import litespark_hf
    from litespark_hf import checkpointing as C

    cfg = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=1024, intermediate_size=4096,
                               num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=8,
                               max_position_embeddings=4096)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()
    ids = torch.randint(0, 8192, (4, 1024), device="cuda")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    out = {}
    for mode in ("all", "auto"):
        model = copy.deepcopy(base)
        litespark_hf.apply(model, checkpoint_layers=mode)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, mp_policy=mp, reshard_after_forward=False)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        losses, peaks = [], []
        for _ in range(3):
            torch.cuda.reset_peak_memory_stats()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            peaks.append(torch.cuda.max_memory_allocated())
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        out[mode] = losses
        if mode == "auto":
            planner = model.__dict__[C._STATE][0]
            placement, recomputed, estimate = planner._placement(), planner.recomputed, planner.estimate
        del model, opt
    assert placement == "sharded"
    free, _ = torch.cuda.mem_get_info()
    if free > 40 * 2 ** 30:
        assert recomputed == 0
    print(f"recomputed {recomputed}, peak {max(peaks) / 2 ** 30:.2f} GiB, estimate {estimate / 2 ** 30:.2f} GiB")
    assert max(peaks) <= estimate
    for a, b in zip(out["all"], out["auto"]):
        assert abs(a - b) <= 1e-3 * abs(a)
