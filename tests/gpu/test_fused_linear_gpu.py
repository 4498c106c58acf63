"""GPU checks of `litespark_kernels.fused_linear` / `swiglu_packed` at Llama-3.2-1B layer shapes, and the
sync-free parts of the fused cross-entropy (``label_count``, the in-place ``grad_output`` scale kernel).

fused_linear under bf16 autocast with fp32 master weights (what the HF Trainer's ``bf16=True`` runs): the output
must equal autocast F.linear's bit for bit (same bf16 GEMM per column block) and every gradient must be at least
as close to the fp64 oracle as stock's (<= 1.05x its error + 1e-4; it skips one bf16 rounding).
"""

import pytest
import torch

import litespark_kernels as lk
from litespark_kernels.ops.linear import fused_linear_reference

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _grads(fn, x, ws, bs, gy, autocast=True):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = fn(x, ws, bs)
    leaves = [x, *ws, *[b for b in bs if b is not None]]
    return y, torch.autograd.grad(y, leaves, gy)


@pytest.mark.parametrize("sizes,k,bias", [([2048, 512, 512], 2048, False), ([8192, 8192], 2048, False),
                                          ([2048], 8192, False), ([896, 128, 128], 896, True), ([123], 1000, True)])
def test_fused_linear_autocast_fp32_master_weights(sizes, k, bias):
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [(0.02 * torch.randn(n, k, device="cuda", generator=g)).requires_grad_(True) for n in sizes]
    bs = [(0.1 * torch.randn(n, device="cuda", generator=g)).requires_grad_(True) if bias else None for n in sizes]
    x = torch.randn(4, 1000, k, device="cuda", generator=g).requires_grad_(True)
    gy = torch.randn(4, 1000, sum(sizes), device="cuda", generator=g).bfloat16()
    y, gr = _grads(lk.fused_linear, x, ws, bs, gy)
    yr, grr = _grads(fused_linear_reference, x, ws, bs, gy)
    assert y.dtype == yr.dtype == torch.bfloat16
    assert torch.equal(y, yr)
    xo = x.detach().double().requires_grad_(True)
    wo = [w.detach().double().requires_grad_(True) for w in ws]
    bo = [b.detach().double().requires_grad_(True) if b is not None else None for b in bs]
    _, go = _grads(fused_linear_reference, xo, wo, bo, gy.double(), autocast=False)
    for a, r, o in zip(gr, grr, go):
        assert a.dtype == r.dtype and a.shape == r.shape
        ea, er = _rel(a, o), _rel(r, o)
        print(f"sizes {sizes}: grad {tuple(a.shape)} fused {ea:.2e} stock {er:.2e}")
        assert ea <= 1.05 * er + 1e-4


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_packed_glu_bf16(act):
    g = torch.Generator(device="cuda").manual_seed(1)
    gu = (2 * torch.randn(4, 1000, 2 * 1000, device="cuda", generator=g)).bfloat16().requires_grad_(True)
    packed = getattr(lk, f"{act}_packed")
    ref = getattr(lk.ops.activations, f"{act}_reference")
    y = packed(gu)
    yr = ref(*gu.chunk(2, -1))
    gy = torch.randn_like(y)
    (d,) = torch.autograd.grad(y, gu, gy)
    (dr,) = torch.autograd.grad(yr, gu, gy)
    go = gu.detach().double().requires_grad_(True)
    yo = ref(*go.chunk(2, -1))
    (do,) = torch.autograd.grad(yo, go, gy.double())
    assert _rel(y, yo) <= 2 * _rel(yr, yo) + 1e-3
    assert _rel(d, do) <= 2 * _rel(dr, do) + 1e-3


@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_flce_label_count_and_grad_output_scale_without_sync(scale):
    g = torch.Generator(device="cuda").manual_seed(2)
    h = torch.randn(4, 1000, 512, device="cuda", generator=g).bfloat16()
    w = (0.02 * torch.randn(32000, 512, device="cuda", generator=g))
    labels = torch.randint(0, 32000, (4, 1000), device="cuda", generator=g)
    labels[:, :300] = -100
    shift = lk.shifted_labels(labels)
    out = []
    for count in (None, lk.count_labels(shift)):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = lk.fused_linear_cross_entropy(hh, ww, shift_labels=shift, label_count=count)
        (loss * scale).backward()
        out.append((loss.detach(), hh.grad, ww.grad))
    hh, ww = h.double().requires_grad_(True), w.double().requires_grad_(True)
    lo = lk.fused_linear_cross_entropy_reference(hh, ww, shift_labels=shift)
    (lo * scale).backward()
    for a, b in zip(out[0], out[1]):
        assert torch.equal(a, b)  # the early count changes nothing
    assert abs(out[1][0].item() - lo.item()) / lo.item() < 1e-3
    assert _rel(out[1][1], hh.grad) < 1e-2 and _rel(out[1][2], ww.grad) < 1e-2


def test_cast_weights_and_folded_clip_on_cuda():
    """`cast_weights` on CUDA equals autocast's per-weight casts; torch's CUDA fused AdamW honours ``grad_scale``
    as the Trainer integration's folded clip uses it (same weights as clip_grad_norm_ + step, gradients clipped)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    groups = [[torch.randn(n, 1000, device="cuda", generator=g) for n in (123, 64)],
              [torch.randn(77, 1000, device="cuda", generator=g)]]
    views = lk.cast_weights(groups, torch.bfloat16)
    for v, ws in zip(views, groups):
        assert torch.equal(v, torch.cat([w.to(torch.bfloat16) for w in ws]))
    p1 = torch.nn.Parameter(torch.randn(4096, 123, device="cuda", generator=g))
    p2 = torch.nn.Parameter(p1.detach().clone())
    o1 = torch.optim.AdamW([p1], lr=1e-2, fused=True)
    o2 = torch.optim.AdamW([p2], lr=1e-2, fused=True)
    for _ in range(3):
        grad = 10 * torch.randn(4096, 123, device="cuda", generator=g)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        n1 = torch.nn.utils.clip_grad_norm_([p1], 1.0)
        o1.step()
        n2 = torch.nn.utils.get_total_norm([p2.grad], 2.0, False, None)
        o2.grad_scale = torch.clamp(1.0 / (n2 + 1e-6), max=1.0).reciprocal()
        o2.step()
        del o2.grad_scale
        assert torch.equal(n1, n2)
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-6)
