"""LitesparkAdamW and its kernel: the update against torch.optim.AdamW, the Triton kernel (CPU interpreter)
against the reference, the state_dict layout, and the cast shadow it keeps for the Litespark forward."""

import copy

import pytest
import torch

import litespark_hf
from litespark_hf import LitesparkAdamW
from litespark_hf.casting import cast_projection_weights, drop_casts
from litespark_kernels.ops.optim import adamw_step, adamw_step_reference
from tiny_models import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SHAPES = [(123,), (7, 45), (2 * 2048 + 5,), (64, 64)]
HP = dict(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def _tensors(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g) for s in shapes]
    ms = [torch.randn(s, generator=g) * 0.1 for s in shapes]
    vs = [torch.rand(s, generator=g) * 0.01 for s in shapes]
    return ps, ms, vs


def _grads(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_reference_matches_torch_adamw_over_steps():
    ps, _, _ = _tensors(0)
    mine = [p.clone() for p in ps]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    params = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = torch.optim.AdamW(params, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], foreach=False)
    for step in range(1, 6):
        gs = _grads(step)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        adamw_step_reference(mine, gs, ms, vs, step=step, **HP)
    for a, b in zip(mine, params):
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(a, ps[0].new_zeros(a.shape))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
def test_triton_kernel_matches_reference_in_interpreter(monkeypatch):
    """The Triton kernel (TRITON_INTERPRET=1) over odd sizes, a tensor spanning 3 blocks with a masked tail, a
    grad_scale, bf16 shadows for some tensors only; three steps."""
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    ps, ms, vs = _tensors(1)
    ref = ([p.clone() for p in ps], [m.clone() for m in ms], [v.clone() for v in vs])
    shadows = [torch.empty(s, dtype=torch.bfloat16) for s in SHAPES]
    shadows[1] = None
    scale = torch.tensor(1.7)
    cache = {}
    for step in range(1, 4):
        gs = _grads(step)
        adamw_step(ps, gs, ms, vs, step=step, grad_scale=scale, shadows=shadows, cache=cache, **HP)
        adamw_step_reference(ref[0], [g.clone() for g in gs], ref[1], ref[2], step=step, grad_scale=scale, **HP)
    assert {"blocks", "table"} <= set(cache)  # the kernel ran (it memoises its tables)
    for mine, theirs in zip(ps + ms + vs, ref[0] + ref[1] + ref[2]):
        torch.testing.assert_close(mine, theirs, rtol=2e-6, atol=1e-7)
    for s, p in zip(shadows, ps):
        if s is None:
            continue
        # the interpreter rounds fp32 -> bf16 toward zero (the GPU test checks round-to-nearest exactly):
        # within one bf16 unit of the weight
        ulp = torch.finfo(torch.bfloat16).eps * p.abs().clamp_min(1e-30)
        assert ((s.float() - p).abs() <= ulp).all()
        assert (s.float() - p).abs().max() > 0  # it is a rounding, not a copy of something else


def test_adamw_step_validates_inputs():
    ps, ms, vs = _tensors(2)
    with pytest.raises(ValueError, match="same length"):
        adamw_step(ps, _grads(0)[:2], ms, vs, step=1, **HP)
    with pytest.raises(ValueError, match="shape"):
        adamw_step(ps, [torch.zeros(3)] + _grads(0)[1:], ms, vs, step=1, **HP)
    with pytest.raises(ValueError, match="step"):
        adamw_step(ps, _grads(0), ms, vs, step=0, **HP)


def _pair(seed=0):
    ps, _, _ = _tensors(seed)
    a = [torch.nn.Parameter(p.clone()) for p in ps]
    b = [torch.nn.Parameter(p.clone()) for p in ps]
    groups = lambda xs: [{"params": xs[:2]}, {"params": xs[2:], "weight_decay": 0.0}]  # noqa: E731
    kw = dict(lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"], weight_decay=HP["weight_decay"])
    return a, b, LitesparkAdamW(groups(a), **kw), torch.optim.AdamW(groups(b), foreach=False, **kw)


def test_optimizer_matches_torch_adamw_with_groups_skips_and_lr_changes():
    a, b, mine, theirs = _pair()
    for step in range(1, 7):
        gs = _grads(step)
        for i, (pa, pb, g) in enumerate(zip(a, b, gs)):
            skip = step == 3 and i == 0  # a parameter without a gradient: its step count falls behind
            pa.grad = None if skip else g.clone()
            pb.grad = None if skip else g.clone()
        for opt in (mine, theirs):
            for group in opt.param_groups:
                group["lr"] = HP["lr"] * (1 - 0.1 * step)  # what an LR scheduler does
        mine.step()
        theirs.step()
    assert mine.state[a[0]]["step"].item() == theirs.state[b[0]]["step"].item() == 5
    assert mine.state[a[1]]["step"].item() == 6
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
    # same state_dict layout: torch's AdamW continues from LitesparkAdamW's state and vice versa
    sd = mine.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    theirs2 = torch.optim.AdamW([{"params": b[:2]}, {"params": b[2:]}], foreach=False)
    theirs2.load_state_dict(sd)
    mine2 = LitesparkAdamW([{"params": a[:2]}, {"params": a[2:]}])
    mine2.load_state_dict(theirs.state_dict())
    gs = _grads(99)
    for pa, pb, g in zip(a, b, gs):
        pa.grad, pb.grad = g.clone(), g.clone()
    mine2.step()
    theirs2.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)


def test_optimizer_grad_scale_divides_gradients_and_leaves_them_unwritten():
    a, b, mine, theirs = _pair(3)
    gs = _grads(5)
    for pa, pb, g in zip(a, b, gs):
        pa.grad, pb.grad = g.clone(), g.clone() / 4.0
    mine.grad_scale = torch.tensor(4.0)
    mine.step()
    theirs.step()
    for pa, pb, g in zip(a, b, gs):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)
        assert torch.equal(pa.grad, g)


def test_optimizer_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.randn(3))]
    for kw in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-0.1),
               dict(lr=torch.tensor(0.1))):
        with pytest.raises(ValueError):
            LitesparkAdamW(p, **kw)


def _litespark_model():
    m = tiny_model("llama", attn_implementation="sdpa", hidden_size=64, intermediate_size=96,
                   num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2)
    litespark_hf.apply(m)
    return m


def _loss(model, ids):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(input_ids=ids, labels=ids).loss


def test_cast_shadow_tracks_the_weights_and_feeds_the_forward():
    torch.manual_seed(0)
    model = _litespark_model()
    plain = copy.deepcopy(model)
    opt = LitesparkAdamW(model.parameters(), lr=1e-2, model=model, shadow_dtype=torch.bfloat16)
    opt_plain = LitesparkAdamW(plain.parameters(), lr=1e-2)
    shadow = opt.shadow
    assert shadow is not None and model.__dict__["_litespark_shadow"] is shadow
    # per layer: q, k, v, o, gate, up, down; and the LM head (the fused loss reads its copy)
    assert len(shadow.params) == 2 * 7 + 1 and shadow.params[-1] is model.lm_head.weight
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        la, lb = _loss(model, ids), _loss(plain, ids)
        assert la.item() == lb.item()  # the shadow's casts are the casts the forward would make
        la.backward()
        lb.backward()
        opt.step()
        opt_plain.step()
        opt.zero_grad()
        opt_plain.zero_grad()
        assert shadow.consistent()
        for p in shadow.params:
            assert torch.equal(shadow.param_views[p], p.detach().to(torch.bfloat16))
    # a change that bypasses the optimizer is seen (version bump) and the next forward refills the copies
    w = shadow.params[0]
    with torch.no_grad():
        w.mul_(1.5)
    assert not shadow.consistent()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        given = cast_projection_weights(model, "cpu")
    assert given and shadow.consistent()
    assert torch.equal(shadow.param_views[w], w.detach().to(torch.bfloat16))
    drop_casts(given)


def test_cast_shadow_refuses_a_graph_from_before_the_step():
    torch.manual_seed(0)
    model = _litespark_model()
    opt = LitesparkAdamW(model.parameters(), lr=1e-2, model=model, shadow_dtype=torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    _loss(model, ids).backward()
    stale = _loss(model, ids)  # saved the weights' casts
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


def test_cast_shadow_is_dropped_when_the_model_is_restored_or_weights_replaced():
    model = _litespark_model()
    opt = LitesparkAdamW(model.parameters(), model=model, shadow_dtype=torch.bfloat16)
    shadow = opt.shadow
    lin = model.model.layers[0].mlp.down_proj
    lin.weight = torch.nn.Parameter(lin.weight.detach().clone())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        given = cast_projection_weights(model, "cpu")
    drop_casts(given)
    assert not shadow.alive and "_litespark_shadow" not in model.__dict__
    model2 = _litespark_model()
    opt2 = LitesparkAdamW(model2.parameters(), model=model2, shadow_dtype=torch.bfloat16)
    litespark_hf.restore(model2)
    assert not opt2.shadow.alive
    # an optimizer over part of the shadowed weights keeps no shadow (the rest would go stale)
    model3 = _litespark_model()
    opt3 = LitesparkAdamW(list(model3.parameters())[:3], model=model3, shadow_dtype=torch.bfloat16)
    assert opt3.shadow is None and "_litespark_shadow" not in model3.__dict__


def _fsdp_trainer(fsdp_version=2, deepspeed=False, device="cuda", offload=False):
    """The attributes of a Trainer that `LitesparkTrainerMixin._litespark_adamw` reads, as accelerate sets them
    (``accelerate launch --config_file accelerate_configs/fsdp2.yaml``), without launching anything."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    plugin = SimpleNamespace(fsdp_version=fsdp_version, cpu_offload=CPUOffloadPolicy() if offload else OffloadPolicy())
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device(device),
                                  distributed_type=DistributedType.DEEPSPEED if deepspeed else DistributedType.FSDP)
    return SimpleNamespace(accelerator=accelerator, is_fsdp_enabled=not deepspeed, is_deepspeed_enabled=deepspeed,
                           args=SimpleNamespace(bf16=True, fp16=False), model=None)


def _trainer_adamw(trainer, optimizer):
    from litespark_hf.trainer import LitesparkTrainerMixin

    trainer._litespark_fsdp2 = lambda: LitesparkTrainerMixin._litespark_fsdp2(trainer)
    trainer._litespark_full_weights = lambda: LitesparkTrainerMixin._litespark_full_weights(trainer)
    return LitesparkTrainerMixin._litespark_adamw(trainer, optimizer)


def test_trainer_swap_under_fsdp2_only():
    # Under FSDP2 the Trainer creates the optimizer before accelerate's prepare shards the model: plain fp32 weights
    # (here on the CPU, as before prepare moves them) are swapped when the accelerator is CUDA, with no shadow.
    w, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    groups = [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=2e-4, betas=(0.9, 0.95), eps=1e-7, fused=False)
    swapped = _trainer_adamw(_fsdp_trainer(), opt)
    assert type(swapped) is LitesparkAdamW and swapped.shadow is None
    assert [g["params"] for g in swapped.param_groups] == [[w], [b]]
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in swapped.param_groups] == \
        [(2e-4, (0.9, 0.95), 1e-7, 0.1), (2e-4, (0.9, 0.95), 1e-7, 0.0)]
    assert _trainer_adamw(_fsdp_trainer(fsdp_version=1), opt) is None  # FSDP1 owns flat parameters
    assert _trainer_adamw(_fsdp_trainer(deepspeed=True), opt) is None  # DeepSpeed owns the step
    assert _trainer_adamw(_fsdp_trainer(offload=True), opt) is None  # shards on the CPU
    assert _trainer_adamw(_fsdp_trainer(device="cpu"), opt) is None  # no CUDA kernel
    half = torch.optim.AdamW([torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))])
    assert _trainer_adamw(_fsdp_trainer(), half) is None
    amsgrad = torch.optim.AdamW([w], amsgrad=True)
    assert _trainer_adamw(_fsdp_trainer(), amsgrad) is None


def test_optimizer_survives_accelerates_fsdp2_parameter_switch():
    # accelerate's _prepare_fsdp2 replaces each group's "params" list (fsdp2_switch_optimizer_parameters) after the
    # optimizer was made; nothing in LitesparkAdamW holds the old tensors, so it steps the new ones.
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    old = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    new = [torch.nn.Parameter(p.detach().clone()) for p in old]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in old]
    mine = LitesparkAdamW([{"params": old[:1]}, {"params": old[1:]}], lr=1e-2)
    theirs = torch.optim.AdamW([{"params": ref[:1]}, {"params": ref[1:]}], lr=1e-2, foreach=False)
    fsdp2_switch_optimizer_parameters(mine, {p.data_ptr: q for p, q in zip(old, new)})
    for step in range(2):
        for p, q in zip(new, ref):
            p.grad = torch.full_like(p, 0.5 + step)
            q.grad = p.grad.clone()
        mine.step()
        theirs.step()
    for p, q in zip(new, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p in mine.state for p in new) and not any(p in mine.state for p in old)


def test_kernel_steps_the_local_shards_of_dtensor_params(monkeypatch, tmp_path):
    """DTensor weights (one-process gloo mesh, Shard(0) as FSDP2 shards them; an empty [0, 4] one among them): the
    Triton kernel (interpreter) gets their local tensors; same update as torch's AdamW on the same DTensors."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        shapes = [(7, 45), (3,), (0, 4), (64, 64)]
        ps, _, _ = _tensors(4, shapes)
        mine = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in ps]
        ref = [torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)])) for p in ps]
        opt = LitesparkAdamW(mine, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
        ref_opt = torch.optim.AdamW(ref, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, foreach=False)
        for step in range(1, 4):
            for p, q, g in zip(mine, ref, _grads(step, shapes)):
                p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            opt.step()
            ref_opt.step()
        assert any({"blocks", "table"} <= set(c) for c in opt._caches.values())  # the kernel ran, on the locals
        for p, q in zip(mine, ref):
            torch.testing.assert_close(p.full_tensor(), q.full_tensor(), rtol=2e-6, atol=1e-7)
            for k in ("exp_avg", "exp_avg_sq"):
                m = opt.state[p][k]
                assert type(m).__name__ == "DTensor" and m.placements == p.placements
                torch.testing.assert_close(m.full_tensor(), ref_opt.state[q][k].full_tensor(), rtol=2e-6, atol=1e-7)
            assert opt.state[p]["step"].item() == ref_opt.state[q]["step"].item() == 3.0
    finally:
        if made:
            dist.destroy_process_group()
