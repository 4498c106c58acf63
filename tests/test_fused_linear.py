"""`litespark_kernels.fused_linear`: several projections of one input as one GEMM, against per-weight F.linear.

CPU: fp32 (values and every gradient to fp32 rounding), bf16 autocast (same output dtype and values as autocast's
F.linear, gradients closer to the fp64 oracle than 2x stock's error), biases on some projections only, frozen
weights, weight gradients stored as row blocks of one buffer, bad inputs, and the sharded-parameter fallback.
"""

import pytest
import torch
import torch.nn.functional as F

import litespark_kernels as lk
from litespark_kernels.linear import fused_linear_reference


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
    import litespark_kernels.linear as lin

    ws, _ = make([4, 4], 8, [0, 0])
    ws[0].ds_id = 3
    called = []
    monkeypatch.setattr(lin._FusedLinear, "apply", lambda *a: called.append(1))
    x = torch.randn(2, 8)
    y = lk.fused_linear(x, ws)
    assert not called
    assert torch.allclose(y, torch.cat([F.linear(x, w) for w in ws], -1))
