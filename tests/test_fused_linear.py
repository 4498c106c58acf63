"""`litespark_kernels.fused_linear`: several projections of one input as one GEMM, against per-weight F.linear.

CPU: fp32 (values and every gradient to fp32 rounding), bf16 autocast (same output dtype and values as autocast's
F.linear, gradients closer to the fp64 oracle than 2x stock's error), biases on some projections only, frozen
weights, weight gradients stored as row blocks of one buffer, bad inputs, and the sharded-parameter fallback.
"""

import pytest
import torch
import torch.nn.functional as F

import litespark_kernels as lk
from litespark_kernels.ops.linear import fused_linear_reference


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(shapes, k, bias_mask, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).requires_grad_(True) for n in shapes]
    bs = [(torch.randn(n, generator=g).to(dtype).requires_grad_(True) if m else None) for n, m in zip(shapes, bias_mask)]
    return ws, bs


def grads(fn, x, ws, bs, gy):
    y = fn(x, ws, bs)
    leaves = [x, *ws, *[b for b in bs if b is not None]]
    return y, torch.autograd.grad(y, leaves, gy)


@pytest.mark.parametrize("shapes,bias_mask", [([64, 16, 16], [0, 0, 0]), ([37, 11, 11], [1, 1, 1]),
                                              ([123], [1]), ([50, 50], [0, 1])])
def test_fp32_matches_per_weight_linear(shapes, bias_mask):
    k = 123
    ws, bs = make(shapes, k, bias_mask)
    x = torch.randn(3, 1000 // 3, k).requires_grad_(True)
    y, g = grads(lk.fused_linear, x, ws, bs, gy := torch.randn(3, 1000 // 3, sum(shapes)))
    yr, gr = grads(fused_linear_reference, x, ws, bs, gy)
    assert y.shape == yr.shape and y.dtype == yr.dtype
    assert rel(y, yr) < 1e-6
    for a, b in zip(g, gr):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b) < 1e-5


def test_bf16_autocast_same_forward_and_gradients_at_least_as_accurate():
    torch.manual_seed(0)
    shapes, k = [96, 32, 32], 64
    ws, bs = make(shapes, k, [1, 1, 1])
    x = torch.randn(2, 50, k).requires_grad_(True)
    gy = torch.randn(2, 50, sum(shapes))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, g = grads(lk.fused_linear, x, ws, bs, gy.bfloat16())
        yr, gr = grads(fused_linear_reference, x, ws, bs, gy.bfloat16())
    assert y.dtype == yr.dtype == torch.bfloat16
    assert torch.equal(y, yr)  # the same bf16 GEMM per column block
    xo = x.detach().double().requires_grad_(True)
    wo = [w.detach().double().requires_grad_(True) for w in ws]
    bo = [b.detach().double().requires_grad_(True) for b in bs]
    _, go = grads(fused_linear_reference, xo, wo, bo, gy.bfloat16().double())
    for a, b, o in zip(g, gr, go):
        assert a.dtype == b.dtype  # fp32 master weights and fp32 input get fp32 gradients, as stock
        assert rel(a, o) <= 2 * rel(b, o) + 1e-3, (rel(a, o), rel(b, o))


def test_weight_gradients_are_blocks_of_one_buffer_and_frozen_weights_get_none():
    ws, bs = make([8, 4, 4], 16, [0, 0, 0])
    ws[1].requires_grad_(False)
    x = torch.randn(5, 16, requires_grad=True)
    lk.fused_linear(x, ws, bs).square().sum().backward()
    assert ws[1].grad is None
    assert ws[0].grad.shape == ws[0].shape and ws[2].grad.shape == ws[2].shape
    ref = [w.detach().requires_grad_(w.requires_grad) for w in ws]
    fused_linear_reference(x.detach(), ref).square().sum().backward()
    assert rel(ws[0].grad, ref[0].grad) < 1e-5 and rel(ws[2].grad, ref[2].grad) < 1e-5


def test_weight_gradients_go_into_a_registered_destination():
    """`GRAD_DESTINATIONS` (set by the CUDA-graph capture): the group's weight-gradient GEMM writes into the given
    buffer, whose row blocks become the gradients, with the values of the usual path; a group with a frozen weight,
    or no registration, is unchanged."""
    from litespark_kernels.ops import linear

    def forward_with_destination(ws, bs, x):
        dest = torch.full((16, 16), float("nan"))
        linear.GRAD_DESTINATIONS[tuple(id(w) for w in ws)] = dest
        try:
            return lk.fused_linear(x, ws, bs), dest
        finally:
            linear.GRAD_DESTINATIONS.clear()

    ws, bs = make([8, 4, 4], 16, [0, 0, 0])
    x = torch.randn(5, 16)
    gy = torch.randn(5, 16)
    expect = [g.clone() for g in torch.autograd.grad(lk.fused_linear(x, ws, bs), ws, gy)]
    y, dest = forward_with_destination(ws, bs, x)
    got = torch.autograd.grad(y, ws, gy)
    assert all(torch.equal(a, b) for a, b in zip(got, expect))
    assert [g.data_ptr() for g in got] == [dest[0:8].data_ptr(), dest[8:12].data_ptr(), dest[12:16].data_ptr()]
    assert torch.equal(dest, torch.cat(expect))
    # a frozen weight in the group: the destination (which holds every row) is not used
    ws[1].requires_grad_(False)
    y, dest = forward_with_destination(ws, bs, x)
    got = torch.autograd.grad(y, [ws[0], ws[2]], gy)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[2]) and torch.isnan(dest).all()


def test_bad_inputs_raise():
    ws, _ = make([4, 4], 8, [0, 0])
    with pytest.raises(ValueError, match="does not take inputs"):
        lk.fused_linear(torch.randn(2, 7), ws)
    with pytest.raises(ValueError, match="biases"):
        lk.fused_linear(torch.randn(2, 8), ws, [None])
    with pytest.raises(ValueError, match="no weights"):
        lk.fused_linear(torch.randn(2, 8), [])


def test_zero3_style_parameter_takes_the_reference_path(monkeypatch):
    """A parameter that a sharding engine gathers only inside its own module (``ds_id``) is not fused."""
    import litespark_kernels.ops.linear as lin

    ws, _ = make([4, 4], 8, [0, 0])
    ws[0].ds_id = 3
    called = []
    monkeypatch.setattr(lin._FusedLinear, "apply", lambda *a: called.append(1))
    x = torch.randn(2, 8)
    y = lk.fused_linear(x, ws)
    assert not called
    assert torch.allclose(y, torch.cat([F.linear(x, w) for w in ws], -1))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_norms_feeding_fused_projections_write_bf16_under_autocast(family):
    """Under bf16 autocast a layer's norms write bf16 (what every consumer cast to anyway): same loss as stock
    autocast bit for bit, gradients within bf16 noise; fp32 output again without autocast or after restore."""
    import litespark_hf
    from tests.tiny_models import random_batch, tiny_model

    stock = tiny_model(family, attn_implementation="sdpa")
    lit = tiny_model(family, attn_implementation="sdpa")
    litespark_hf.apply(lit)
    ids = random_batch()
    batch = {"input_ids": ids, "labels": ids}
    seen = []
    layer = lit.model.layers[0]
    hooks = [layer.input_layernorm.register_forward_hook(lambda m, i, o: seen.append(o.dtype)),
             layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(o.dtype))]
    losses, grads = [], []
    for model in (stock, lit):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert torch.equal(losses[0], losses[1])
    for name, g in grads[0].items():
        assert rel(grads[1][name], g) < 3e-2, name
    seen.clear()
    lit(input_ids=ids)  # no autocast: the stock fp32 output
    assert seen == [torch.float32, torch.float32]
    for h in hooks:
        h.remove()
    litespark_hf.restore(lit)
    assert "_litespark_consumer" not in layer.input_layernorm.__dict__


def test_cast_weights_concatenates_each_group_into_fresh_views():
    g = torch.Generator().manual_seed(3)
    groups = [[torch.randn(n, 123, generator=g) for n in (64, 16, 16)], [torch.randn(37, 123, generator=g)],
              [torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]]
    views = lk.cast_weights(groups, torch.bfloat16)
    assert [tuple(v.shape) for v in views] == [(96, 123), (37, 123), (8, 7)]
    for v, ws in zip(views, groups):
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, torch.cat(ws).to(torch.bfloat16))
    again = lk.cast_weights(groups, torch.bfloat16)
    assert again[0].data_ptr() != views[0].data_ptr()  # a graph that saved the first views keeps them intact
    # used by fused_linear instead of its own cast: same output, gradients still reach the fp32 weights
    ws = [w.requires_grad_(True) for w in groups[0]]
    x = torch.randn(10, 123)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_cast = lk.fused_linear(x, ws, cast=views[0])
        y_own = lk.fused_linear(x, ws)
        y_bad = lk.fused_linear(x, ws, cast=views[1])  # wrong shape: ignored, cast here
    assert torch.equal(y_cast, y_own) and torch.equal(y_bad, y_own)
    y_cast.float().sum().backward()
    assert all(w.grad is not None and w.grad.dtype == torch.float32 for w in ws)


@pytest.mark.parametrize("family", ["llama", "qwen2", "starcoder2"])
def test_projection_weights_cast_once_per_forward(family, monkeypatch):
    """Under autocast the training forward casts all fused projection weights at once (`cast_projection_weights`);
    losses and gradients equal the per-projection casts' through two AdamW steps (fused AdamW does not bump version
    counters, so a cache keyed on versions would go stale: the casts are made fresh for each forward and dropped)."""
    import litespark_hf
    from litespark_hf import modules as M
    from tests.tiny_models import random_batch, tiny_model

    calls = []
    real = lk.cast_weights
    monkeypatch.setattr(lk, "cast_weights", lambda groups, dtype: calls.append(len(groups)) or real(groups, dtype))
    ids = random_batch()
    runs = []
    for use_casts in (True, False):
        model = tiny_model(family, attn_implementation="sdpa")
        litespark_hf.apply(model)
        if not use_casts:
            model.__dict__.pop("_litespark_cast_owners")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
        losses = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
        runs.append((losses, grads))
        assert not any("_litespark_casts" in m.__dict__ for m in model.modules())
    n_layers = len(model.model.layers)
    # qkv, o, gate_up, down (c_fc, c_proj and o) per layer, and the LM head (read by the fused loss), once per forward
    assert calls == [4 * n_layers + 1] * 3
    (l1, g1), (l2, g2) = runs
    assert all(torch.equal(a, b) for a, b in zip(l1, l2))
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    # not without autocast, nor with gradient checkpointing
    calls.clear()
    litespark_hf.apply(model)
    model.__dict__["_litespark_cast_owners"] = [m for m in model.modules() if hasattr(m, "litespark_cast_groups")]
    model(input_ids=ids, labels=ids)
    model.gradient_checkpointing_enable()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls == []
    assert M.cast_projection_weights(model, "cpu") == []
