"""GPU checks of `litespark_kernels.ops.lora_linear` (frozen projections + LoRA adapters as one autograd node) at
Llama-3.2-1B shapes and odd ones, under bf16 and fp16 autocast with fp32 adapters (what TRL's LoRA training runs):
output and every gradient at least as close to the fp64 oracle as PEFT's composition under the same autocast
(<= 1.1x its error + 2e-3: it rounds once fewer, in the GEMM's accumulator)."""

import pytest
import torch

from litespark_kernels.ops.lora_linear import lora_linear, lora_linear_reference

pytestmark = pytest.mark.gpu


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(fn, x, ws, bs, a_ws, b_ws, scal, slots, gy, dtype):
    with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        y = fn(x, ws, bs, a_ws, b_ws, scal, slots)
    return y, torch.autograd.grad(y, [x, *a_ws, *b_ws], gy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes,k,ranks,slots,tokens", [
    ([2048, 512, 512], 2048, [16, 16, 16], [0, 1, 2], 4000),  # q/k/v
    ([8192, 8192], 2048, [16, 16], [0, 1], 3000),  # gate/up
    ([2048], 8192, [16], [0], 1000),  # down
    ([123, 40, 40], 123, [8, 4], [0, 2], 1000),  # odd sizes, k without an adapter
])
def test_lora_linear_autocast(dtype, sizes, k, ranks, slots, tokens):
    g = torch.Generator(device="cuda").manual_seed(0)
    ws = [0.02 * torch.randn(n, k, device="cuda", generator=g) for n in sizes]
    bs = [None] * len(sizes)
    a_ws = [(torch.randn(r, k, device="cuda", generator=g) / k ** 0.5).requires_grad_() for r in ranks]
    b_ws = [(0.02 * torch.randn(sizes[s], r, device="cuda", generator=g)).requires_grad_() for s, r in zip(slots, ranks)]
    scal = [2.0] * len(ranks)
    x = torch.randn(1, tokens, k, device="cuda", generator=g).to(dtype).requires_grad_()
    gy = torch.randn(1, tokens, sum(sizes), device="cuda", generator=g).to(dtype)
    y, gr = _run(lora_linear, x, ws, bs, a_ws, b_ws, scal, slots, gy, dtype)
    yr, grr = _run(lora_linear_reference, x, ws, bs, a_ws, b_ws, scal, slots, gy, dtype)
    d = lambda t: t.detach().double().requires_grad_()  # noqa: E731
    yo, go = _run(lora_linear_reference, d(x), [w.double() for w in ws], bs, [d(a) for a in a_ws],
                  [d(b) for b in b_ws], scal, slots, gy.double(), None)
    assert y.dtype == yr.dtype == dtype
    assert _rel(y, yo) <= 1.1 * _rel(yr, yo) + 2e-3
    for a, r, o in zip(gr, grr, go):
        assert a.dtype == r.dtype and a.shape == r.shape and torch.isfinite(a).all()
        ea, er = _rel(a, o), _rel(r, o)
        print(f"{dtype} sizes {sizes}: grad {tuple(a.shape)} one-node {ea:.2e} PEFT-style {er:.2e}")
        assert ea <= 1.1 * er + 2e-3
