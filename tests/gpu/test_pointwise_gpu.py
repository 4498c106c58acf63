"""Norm, RoPE and activation Triton kernels on the GPU, bf16 and fp16, at real sizes, forward and backward.

Criterion, the same for every op and every output (forward value and each input gradient): with the fp32 oracle
being the PyTorch reference run on the fp32-upcast inputs,

    relerr(kernel, oracle) <= 2 * relerr(reference in the low dtype, oracle) + slack,    relerr = |a-b|_2 / |b|_2

slack = eps(dtype) / 20 (bf16: 3.9e-4, fp16: 4.9e-5), a twentieth of one rounding, which covers outputs that the
low-precision reference gets exactly right (e.g. the fused add's residual sum and its pass-through gradient).
Per op, what makes the two sides differ:
- rms_norm / add_rms_norm: same rounding order (fp32 statistics, round to the input dtype, then times weight);
  the kernel's gradients stay in fp32 until one final rounding, the reference rounds dy*w and the products.
  Sizes: 8192x4096, 4096x2048 fused add, hidden 16384 (in-register limit), 32768 (looped path), 3000 (not 2^k).
- layer_norm: fp32 throughout, one rounding (as F.layer_norm's CUDA kernel; its weight/bias gradients are
  summed from rounded products). 8192x3072 with and without bias, 64x20000 (looped path).
- rope: one fused multiply-add then one rounding (the reference rounds three times). B=2, S=2048, 32/8 heads,
  D=64 and D=128, q/k as the transposed [B, S, H, D] views that attention layers pass.
- swiglu / geglu / gelu_tanh_bias: activation rounded to the dtype before the product (as the reference);
  the backward recomputes in fp32. 8192x8192 gated, 8192x12288 GELU with and without bias.
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "non-finite values (unwritten or overflowed output)"
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(name, fn_kernel, fn_ref, tensors, dtype, grad_idx=None):
    """Forward and gradients of the tensors in grad_idx: kernel vs low-dtype reference vs fp32 oracle."""
    grad_idx = range(len(tensors)) if grad_idx is None else grad_idx
    slack = torch.finfo(dtype).eps / 20

    def prep(cast):
        out = []
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                out.append(t)
                continue
            c = cast(t).detach().clone()
            out.append(c.requires_grad_(i in grad_idx))
        return out

    ins_k, ins_r, ins_o = prep(lambda t: t), prep(lambda t: t), prep(lambda t: t.float())
    out_k, out_r, out_o = fn_kernel(*ins_k), fn_ref(*ins_r), fn_ref(*ins_o)
    out_k = out_k if isinstance(out_k, tuple) else (out_k,)
    out_r = out_r if isinstance(out_r, tuple) else (out_r,)
    out_o = out_o if isinstance(out_o, tuple) else (out_o,)
    report = []
    for j, (k, r, o) in enumerate(zip(out_k, out_r, out_o)):
        assert k.shape == r.shape and k.dtype == r.dtype
        ek, er = rel_err(k, o), rel_err(r, o)
        report.append((f"out{j}", ek, er))
    gen = torch.Generator(device="cuda").manual_seed(123)
    gouts = [torch.randn(o.shape, device="cuda", generator=gen) for o in out_o]
    leaves = lambda ins: [ins[i] for i in grad_idx]  # noqa: E731
    gk = torch.autograd.grad(out_k, leaves(ins_k), [g.to(o.dtype) for g, o in zip(gouts, out_k)])
    gr = torch.autograd.grad(out_r, leaves(ins_r), [g.to(o.dtype) for g, o in zip(gouts, out_r)])
    go = torch.autograd.grad(out_o, leaves(ins_o), gouts)
    for i, k, r, o in zip(grad_idx, gk, gr, go):
        assert k.dtype == r.dtype and k.shape == r.shape
        report.append((f"grad{i}", rel_err(k, o), rel_err(r, o)))
    print(f"\n{name} {dtype}: " + ", ".join(f"{n} kernel {ek:.2e} ref {er:.2e}" for n, ek, er in report))
    for n, ek, er in report:
        assert ek <= 2 * er + slack, f"{name} {n}: kernel {ek:.3e} vs reference {er:.3e}"


def rnd(*shape, dtype, scale=1.0, shift=0.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, device="cuda", generator=g) + shift).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(8192, 4096), (2048, 3000), (256, 16384), (64, 32768)])
def test_rms_norm(dtype, rows, hidden):
    from litespark_kernels.ops._rms_norm_triton import rms_norm_triton
    from litespark_kernels.ops.rms_norm import rms_norm_reference

    x, w = rnd(rows, hidden, dtype=dtype), rnd(hidden, dtype=dtype, scale=0.2, shift=1.0, seed=1)
    check(f"rms_norm {rows}x{hidden}", rms_norm_triton, rms_norm_reference, (x, w, 1e-6), dtype, grad_idx=(0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(4096, 2048), (64, 32768)])
def test_add_rms_norm(dtype, rows, hidden):
    from litespark_kernels.ops._rms_norm_triton import add_rms_norm_triton
    from litespark_kernels.ops.rms_norm import add_rms_norm_reference

    x, r = rnd(rows, hidden, dtype=dtype), rnd(rows, hidden, dtype=dtype, seed=2)
    w = rnd(hidden, dtype=dtype, scale=0.2, shift=1.0, seed=1)
    check(f"add_rms_norm {rows}x{hidden}", add_rms_norm_triton, add_rms_norm_reference, (x, r, w, 1e-6), dtype,
          grad_idx=(0, 1, 2))


def test_rms_norm_bf16_matches_reference_bits():
    """Same rounding order as LlamaRMSNorm: bf16 outputs are equal almost everywhere (rsqrt/summation order
    may flip a rare rounding by one ulp)."""
    from litespark_kernels.ops._rms_norm_triton import rms_norm_triton
    from litespark_kernels.ops.rms_norm import rms_norm_reference

    x, w = rnd(4096, 4096, dtype=torch.bfloat16), rnd(4096, dtype=torch.bfloat16, scale=0.2, shift=1.0, seed=1)
    y, yr = rms_norm_triton(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    frac = (y != yr).float().mean().item()
    print(f"\nrms_norm bf16 elements differing from the reference: {frac:.2e}")
    assert frac < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden,bias", [(8192, 3072, True), (8192, 3072, False), (64, 20000, True)])
def test_layer_norm(dtype, rows, hidden, bias):
    from litespark_kernels.ops._layer_norm_triton import layer_norm_triton

    def ref(x, w, b, eps):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)

    x = rnd(rows, hidden, dtype=dtype, shift=0.5)
    w = rnd(hidden, dtype=dtype, scale=0.2, shift=1.0, seed=1)
    b = rnd(hidden, dtype=dtype, scale=0.2, seed=2) if bias else None
    check(f"layer_norm {rows}x{hidden} bias={bias}", layer_norm_triton, ref, (x, w, b, 1e-5), dtype,
          grad_idx=(0, 1, 2) if bias else (0, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_rope(dtype, D):
    from litespark_kernels.ops._rope_triton import apply_rope_triton
    from litespark_kernels.ops.rope import apply_rope_reference

    B, S, Hq, Hkv = 2, 2048, 32, 8
    q = rnd(B, S, Hq, D, dtype=dtype).transpose(1, 2)
    k = rnd(B, S, Hkv, D, dtype=dtype, seed=3).transpose(1, 2)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
    freqs = torch.arange(S, device="cuda", dtype=torch.float32)[:, None] * inv
    emb = torch.cat((freqs, freqs), -1)[None]
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)

    def ref(q, k, cos, sin):
        return apply_rope_reference(q, k, cos.to(q.dtype), sin.to(q.dtype))

    def kern(q, k, cos, sin):
        qo, ko = apply_rope_triton(q, k, cos, sin)
        assert qo.stride() == q.stride()  # layout preserved, no copy
        return qo, ko

    check(f"rope D{D}", kern, ref, (q, k, cos, sin), dtype, grad_idx=(0, 1))
    # every launch configuration computes the same values
    from litespark_kernels.ops._rope_triton import rope_launch

    base = rope_launch(q, k, cos, sin, False)
    for block_s, num_warps in ((1, 2), (16, 8)):
        other = rope_launch(q, k, cos, sin, False, block_s=block_s, num_warps=num_warps)
        assert all(torch.equal(a, b) for a, b in zip(base, other))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_glu(dtype, op):
    from litespark_kernels.ops import _activations_triton as act
    from litespark_kernels.ops.activations import geglu_reference, swiglu_reference

    kern, ref = {"swiglu": (act.swiglu_triton, swiglu_reference), "geglu": (act.geglu_triton, geglu_reference)}[op]
    g, u = rnd(8192, 8192, dtype=dtype, scale=2.0), rnd(8192, 8192, dtype=dtype, seed=4)
    check(f"{op} 8192x8192", kern, ref, (g, u), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gelu_tanh_bias(dtype, bias):
    from litespark_kernels.ops._activations_triton import gelu_tanh_bias_triton
    from litespark_kernels.ops.activations import gelu_tanh_bias_reference

    x = rnd(8192, 12288, dtype=dtype, scale=2.0)
    b = rnd(12288, dtype=dtype, scale=0.5, seed=5) if bias else None
    check(f"gelu_tanh_bias bias={bias}", gelu_tanh_bias_triton, gelu_tanh_bias_reference, (x, b), dtype,
          grad_idx=(0, 1) if bias else (0,))


def test_dispatchers_use_triton_on_cuda():
    """The public ops pick the kernels on CUDA tensors (no fallback warning) and give the same results."""
    import warnings

    import litespark_kernels as lk
    from litespark_kernels.ops._rms_norm_triton import rms_norm_triton

    x, w = rnd(64, 123, dtype=torch.bfloat16), rnd(123, dtype=torch.bfloat16, shift=1.0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = lk.rms_norm(x, w, 1e-6)
    torch.testing.assert_close(y, rms_norm_triton(x, w, 1e-6), rtol=0, atol=0)


@pytest.mark.parametrize("rows,hidden", [(1000, 123), (8192, 2048), (64, 20000)])
def test_norms_writing_bf16_under_mixed_precision(rows, hidden):
    """What the decoder layers run under bf16 autocast: RMSNorm of the fp32 residual stream written in bf16
    (``out_dtype``), and the fused add of a bf16 branch output into the fp32 stream. Forward and gradients against
    stock's path (fp32 reference, then autocast's cast to bf16), both measured against a float64 oracle."""
    from litespark_kernels.ops._rms_norm_triton import add_rms_norm_triton, rms_norm_triton
    from litespark_kernels.ops.rms_norm import add_rms_norm_reference, rms_norm_reference

    bf = torch.bfloat16
    cases = {
        "rms_norm": (lambda x, w: rms_norm_triton(x, w, 1e-6, bf),
                     lambda x, w: rms_norm_reference(x, w, 1e-6).to(bf),
                     lambda x, w: rms_norm_reference(x, w, 1e-6),
                     (rnd(rows, hidden, dtype=torch.float32), rnd(hidden, dtype=torch.float32, scale=0.2, shift=1.0))),
        "add_rms_norm": (lambda x, r, w: add_rms_norm_triton(x, r, w, 1e-6, bf),
                         lambda x, r, w: (lambda y, s: (y.to(bf), s))(*add_rms_norm_reference(x, r, w, 1e-6)),
                         lambda x, r, w: add_rms_norm_reference(x, r, w, 1e-6),
                         (rnd(rows, hidden, dtype=bf, seed=3), rnd(rows, hidden, dtype=torch.float32, seed=4),
                          rnd(hidden, dtype=torch.float32, scale=0.2, shift=1.0, seed=5))),
    }
    slack = torch.finfo(bf).eps / 20
    for name, (kern, ref, oracle, ins) in cases.items():
        ik = [t.clone().requires_grad_(True) for t in ins]
        ir = [t.clone().requires_grad_(True) for t in ins]
        io = [t.double().requires_grad_(True) for t in ins]
        ok, orf, oo = kern(*ik), ref(*ir), oracle(*io)
        ok, orf, oo = [o if isinstance(o, tuple) else (o,) for o in (ok, orf, oo)]
        assert ok[0].dtype == bf and all(a.dtype == b.dtype for a, b in zip(ok, orf))
        gen = torch.Generator(device="cuda").manual_seed(7)
        gouts = [torch.randn(o.shape, device="cuda", generator=gen, dtype=torch.float64) for o in oo]
        gk = torch.autograd.grad(ok, ik, [g.to(o.dtype) for g, o in zip(gouts, ok)])
        gr = torch.autograd.grad(orf, ir, [g.to(o.dtype) for g, o in zip(gouts, orf)])
        go = torch.autograd.grad(oo, io, gouts)
        pairs = [(f"out{j}", a, b, c) for j, (a, b, c) in enumerate(zip(ok, orf, oo))]
        pairs += [(f"grad{j}", a, b, c) for j, (a, b, c) in enumerate(zip(gk, gr, go))]
        for label, a, b, c in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape, (name, label)
            ek, er = rel_err(a, c), rel_err(b, c)
            print(f"{name} {rows}x{hidden} {label}: kernel {ek:.2e} stock {er:.2e}")
            assert ek <= 2 * er + slack, (name, label, ek, er)
        if name == "add_rms_norm":
            # the bf16 branch's gradient is written by the kernel itself: the residual's fp32 gradient rounded once
            assert torch.equal(gk[0], gk[1].to(bf))
