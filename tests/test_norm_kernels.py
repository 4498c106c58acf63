"""RMSNorm, fused add+RMSNorm and LayerNorm Triton kernels against their PyTorch references.

Runs in Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 without CUDA), fp32 and fp16, on small random
inputs with odd hidden sizes (123), several rows, strided rows, and both the in-register and the looped
(wide-row) paths. Gradients are compared with the reference's autograd; the oracle is the reference on float64.
"""

import pytest
import torch

from litespark_kernels.ops import _layer_norm_triton as ln_mod
from litespark_kernels.ops import _rms_norm_triton as rms_mod
from litespark_kernels.ops.layer_norm import layer_norm_reference
from litespark_kernels.ops.rms_norm import add_rms_norm_reference, rms_norm_reference

DTYPES = [torch.float32, torch.float16]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_close(ours, ref, oracle, slack):
    """ours is no farther from the float64 oracle than twice the same-dtype reference, plus slack."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    e_ours, e_ref = rel_err(ours, oracle), rel_err(ref, oracle)
    assert e_ours <= 2 * e_ref + slack, (e_ours, e_ref)


def slack_for(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-3


def grads(out, inputs, grad_out):
    outs = out if isinstance(out, tuple) else (out,)
    gs = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    return torch.autograd.grad(outs, inputs, gs)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.fixture
def looped(monkeypatch):
    """Force the wide-row (looped) kernels on small rows."""
    monkeypatch.setattr(rms_mod, "MAX_FUSED_BLOCK", 32)
    monkeypatch.setattr(rms_mod, "LOOP_BLOCK", 32)
    monkeypatch.setattr(ln_mod, "MAX_FUSED_BLOCK", 32)
    monkeypatch.setattr(ln_mod, "LOOP_BLOCK", 32)


def _rms_case(shape, dtype, w_dtype=None, strided=False):
    torch.manual_seed(0)
    n = shape[-1]
    if strided:  # rows of a wider buffer: non-contiguous leading dimension
        x = torch.randn(*shape[:-1], n + 7, dtype=dtype)[..., :n]
    else:
        x = torch.randn(shape, dtype=dtype)
    w = (1.0 + 0.3 * torch.randn(n)).to(w_dtype or dtype)
    return x, w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,strided", [((2, 3, 123), False), ((37, 64), True), ((4, 256), False)])
def test_rms_norm_forward_backward(dtype, shape, strided):
    x, w = _rms_case(shape, dtype, strided=strided)
    eps = 1e-6
    xt, wt = leaf(x), leaf(w)
    xr, wr = leaf(x), leaf(w)
    xo, wo = leaf(x.double()), leaf(w.double())
    y = rms_mod.rms_norm_triton(xt, wt, eps)
    yr = rms_norm_reference(xr, wr, eps)
    yo = rms_norm_reference(xo, wo, eps)
    check_close(y, yr, yo, slack_for(dtype))
    g = torch.randn_like(y)
    for ours, ref, orc in zip(grads(y, (xt, wt), g), grads(yr, (xr, wr), g), grads(yo, (xo, wo), g.double())):
        check_close(ours, ref, orc, slack_for(dtype))


def test_rms_norm_rounding_order_fp16():
    """Normalise in fp32, round to fp16, then multiply by the weight: the fp16 output matches bit for bit
    almost everywhere (rsqrt and summation order may move a rare element by one ulp)."""
    x, w = _rms_case((16, 123), torch.float16)
    y = rms_mod.rms_norm_triton(x, w, 1e-6)
    yr = rms_norm_reference(x, w, 1e-6)
    mismatched = (y != yr).float().mean().item()
    assert mismatched < 0.01
    ulp = torch.finfo(torch.float16).eps * yr.abs().float().clamp_min(2**-14)
    assert ((y.float() - yr.float()).abs() <= ulp * 1.01).all()


def test_rms_norm_fp32_weight_with_fp16_input():
    """Output dtype follows weight * x.to(input_dtype): fp32 here."""
    x, w = _rms_case((5, 123), torch.float16, w_dtype=torch.float32)
    xt, wt, xr, wr = leaf(x), leaf(w), leaf(x), leaf(w)
    y = rms_mod.rms_norm_triton(xt, wt, 1e-5)
    yr = rms_norm_reference(xr, wr, 1e-5)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, yr, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y)
    (dx, dw), (dxr, dwr) = grads(y, (xt, wt), g), grads(yr, (xr, wr), g)
    assert dx.dtype == torch.float16 and dw.dtype == torch.float32
    torch.testing.assert_close(dx, dxr, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(dw, dwr, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_s", [True, False])
def test_add_rms_norm_forward_backward(dtype, use_s):
    torch.manual_seed(1)
    x = torch.randn(3, 7, 123, dtype=dtype)
    r = torch.randn(3, 7, 123, dtype=dtype)
    w = (1.0 + 0.3 * torch.randn(123)).to(dtype)
    ins = [tuple(leaf(t) for t in (x, r, w)) for _ in range(2)]
    ins.append(tuple(leaf(t.double()) for t in (x, r, w)))
    (y, s) = rms_mod.add_rms_norm_triton(*ins[0], 1e-6)
    (yr, sr) = add_rms_norm_reference(*ins[1], 1e-6)
    (yo, so) = add_rms_norm_reference(*ins[2], 1e-6)
    assert torch.equal(s, sr)  # the residual sum is the same single rounding
    check_close(y, yr, yo, slack_for(dtype))
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    outs = [(y, s), (yr, sr), (yo, so)]
    if use_s:
        go = [(gy, gs), (gy, gs), (gy.double(), gs.double())]
    else:
        outs = [(o[0],) for o in outs]
        go = [(gy,), (gy,), (gy.double(),)]
    all_grads = [torch.autograd.grad(o, i, g) for o, i, g in zip(outs, ins, go)]
    for ours, ref, orc in zip(*all_grads):
        check_close(ours, ref, orc, slack_for(dtype))


@pytest.mark.parametrize("hidden", [123, 20000])
def test_add_rms_norm_mixed_dtypes_as_in_a_decoder_layer(hidden):
    """A bf16 attention output plus the fp32 residual stream, fp32 weight, output written in bf16 (what the decoder
    layer's fused path does under autocast): the sum is stock's ``residual + x`` bit for bit, the output is the
    reference's fp32 output rounded once, and the input gradients come back in each input's dtype (the bf16 one
    written by the backward kernel itself). Hidden 20000: the looped kernels (rows wider than 16384)."""
    torch.manual_seed(4)
    x = leaf(torch.randn(2, 5, hidden).to(torch.bfloat16))
    r, w = leaf(torch.randn(2, 5, hidden)), leaf(1.0 + 0.3 * torch.randn(hidden))
    y, s = rms_mod.add_rms_norm_triton(x, r, w, 1e-6, torch.bfloat16)
    xr, rr, wr = (leaf(t.detach()) for t in (x, r, w))
    yr, sr = add_rms_norm_reference(xr, rr, wr, 1e-6)
    assert s.dtype == torch.float32 and torch.equal(s, r + x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, yr.to(torch.bfloat16), atol=1e-2, rtol=1e-2)
    gy, gs = torch.randn_like(yr), torch.randn_like(s)
    dx, dr, dw = torch.autograd.grad((y, s), (x, r, w), (gy.to(torch.bfloat16), gs))
    dxr, drr, dwr = torch.autograd.grad((yr, sr), (xr, rr, wr), (gy.to(torch.bfloat16).float(), gs))
    assert (dx.dtype, dr.dtype, dw.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    torch.testing.assert_close(dr, drr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx, dxr, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dw, dwr, atol=1e-3, rtol=1e-3)


def test_add_rms_norm_only_residual_output_used():
    torch.manual_seed(2)
    x, r, w = leaf(torch.randn(4, 123)), leaf(torch.randn(4, 123)), leaf(torch.ones(123))
    _, s = rms_mod.add_rms_norm_triton(x, r, w, 1e-6)
    g = torch.randn_like(s)
    dx, dr = torch.autograd.grad(s, (x, r), g)
    torch.testing.assert_close(dx, g)
    torch.testing.assert_close(dr, g)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_backward_several_rows_per_program(dtype):
    """Persistent backward: each program walks several row tiles and accumulates dweight."""
    x, w = _rms_case((203, 123), dtype)
    y, _, rstd = rms_mod.rms_norm_forward(x, None, w, 1e-6)
    dy = torch.randn_like(y)
    dx, dw = rms_mod.rms_norm_backward(dy, None, x, w, rstd, block_m=4, programs_per_sm=1)
    xr, wr = leaf(x), leaf(w)
    xo, wo = leaf(x.double()), leaf(w.double())
    dxr, dwr = grads(rms_norm_reference(xr, wr, 1e-6), (xr, wr), dy)
    dxo, dwo = grads(rms_norm_reference(xo, wo, 1e-6), (xo, wo), dy.double())
    check_close(dx, dxr, dxo, slack_for(dtype))
    check_close(dw, dwr, dwo, slack_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_looped_path(looped, dtype):
    x, w = _rms_case((6, 123), dtype)
    r = torch.randn_like(x)
    ins = [tuple(leaf(t) for t in (x, r, w)) for _ in range(2)] + [tuple(leaf(t.double()) for t in (x, r, w))]
    y, s = rms_mod.add_rms_norm_triton(*ins[0], 1e-6)
    yr, sr = add_rms_norm_reference(*ins[1], 1e-6)
    yo, so = add_rms_norm_reference(*ins[2], 1e-6)
    assert torch.equal(s, sr)
    check_close(y, yr, yo, slack_for(dtype))
    gy, gs = torch.randn_like(y), torch.randn_like(s)
    g3 = [torch.autograd.grad((a, b), i, (gy.to(a.dtype), gs.to(b.dtype)))
          for (a, b), i in zip([(y, s), (yr, sr), (yo, so)], ins)]
    for ours, ref, orc in zip(*g3):
        check_close(ours, ref, orc, slack_for(dtype))
    # plain RMSNorm on the looped path
    xt, wt, xo2, wo2 = leaf(x), leaf(w), leaf(x.double()), leaf(w.double())
    y1 = rms_mod.rms_norm_triton(xt, wt, 1e-6)
    y1o = rms_norm_reference(xo2, wo2, 1e-6)
    assert rel_err(y1, y1o) < (1e-6 if dtype == torch.float32 else 2e-3)
    d_ours = grads(y1, (xt, wt), gy)
    d_orc = grads(y1o, (xo2, wo2), gy.double())
    for a, b in zip(d_ours, d_orc):
        assert rel_err(a, b) < (1e-5 if dtype == torch.float32 else 5e-3)


def _ln_case(shape, dtype, bias=True, strided=False):
    torch.manual_seed(3)
    n = shape[-1]
    x = torch.randn(*shape[:-1], n + 5, dtype=dtype)[..., :n] if strided else torch.randn(shape, dtype=dtype)
    x = x + 0.5  # a non-zero mean
    w = (1.0 + 0.3 * torch.randn(n)).to(dtype)
    b = (0.2 * torch.randn(n)).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,strided", [((2, 3, 123), False), ((37, 64), True)])
def test_layer_norm_forward_backward(dtype, bias, shape, strided):
    x, w, b = _ln_case(shape, dtype, bias, strided)
    tensors = (x, w) + ((b,) if bias else ())
    ins = [tuple(leaf(t) for t in tensors) for _ in range(2)] + [tuple(leaf(t.double()) for t in tensors)]

    def call(fn, i):
        return fn(i[0], i[1], i[2] if bias else None, 1e-5)

    y = call(ln_mod.layer_norm_triton, ins[0])
    yr = call(layer_norm_reference, ins[1])
    yo = call(layer_norm_reference, ins[2])
    check_close(y, yr, yo, slack_for(dtype))
    g = torch.randn_like(y)
    all_grads = [grads(o, i, gg) for o, i, gg in zip((y, yr, yo), ins, (g, g, g.double()))]
    for ours, ref, orc in zip(*all_grads):
        check_close(ours, ref, orc, slack_for(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_looped_and_persistent_paths(looped, dtype):
    x, w, b = _ln_case((9, 123), dtype)
    ins = [tuple(leaf(t) for t in (x, w, b)) for _ in range(2)] + [tuple(leaf(t.double()) for t in (x, w, b))]
    y = ln_mod.layer_norm_triton(*ins[0], 1e-5)
    yr = layer_norm_reference(*ins[1], 1e-5)
    yo = layer_norm_reference(*ins[2], 1e-5)
    check_close(y, yr, yo, slack_for(dtype))
    g = torch.randn_like(y)
    all_grads = [grads(o, i, gg) for o, i, gg in zip((y, yr, yo), ins, (g, g, g.double()))]
    for ours, ref, orc in zip(*all_grads):
        check_close(ours, ref, orc, slack_for(dtype))


def test_layer_norm_backward_several_rows_per_program():
    x, w, b = _ln_case((203, 123), torch.float32)
    y, mean, rstd = ln_mod.layer_norm_forward(x, w, b, 1e-5)
    dy = torch.randn_like(y)
    dx, dw, db = ln_mod.layer_norm_backward(dy, x, w, True, mean, rstd, block_m=4, programs_per_sm=1)
    xo, wo, bo = leaf(x.double()), leaf(w.double()), leaf(b.double())
    dxo, dwo, dbo = grads(layer_norm_reference(xo, wo, bo, 1e-5), (xo, wo, bo), dy.double())
    assert rel_err(dx, dxo) < 1e-5 and rel_err(dw, dwo) < 1e-5 and rel_err(db, dbo) < 1e-5


def test_dispatcher_under_torch_compile_matches_eager(monkeypatch):
    """Under torch.compile the Triton call is a graph break (kept out of the graph); outside it is a direct call."""
    import litespark_kernels as lk

    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")  # the interpreter path (conftest sets TRITON_INTERPRET=1)
    x = torch.randn(5, 123)
    w = torch.randn(123)
    eager = lk.rms_norm(x, w, 1e-6)
    compiled = torch.compile(lambda a, b: lk.rms_norm(a, b, 1e-6) * 2, backend="eager")(x, w)
    torch.testing.assert_close(compiled, eager * 2)
    torch.testing.assert_close(eager, lk.rms_norm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-5)
