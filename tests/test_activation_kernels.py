"""SwiGLU, GeGLU and GELU-tanh(+bias) Triton kernels against the PyTorch references (CPU interpreter, fp32/fp16).

Odd widths (123), several rows, gate/up as strided halves of one fused projection, bias and no bias, and the
persistent dbias reduction with several row tiles per program. The oracle is the reference on float64.
"""

import pytest
import torch

from litespark_kernels.ops import _activations_triton as act
from litespark_kernels.ops.activations import geglu_reference, gelu_tanh_bias_reference, swiglu_reference

DTYPES = [torch.float32, torch.float16]

# The interpreter's numpy exp overflows to inf in the far tail of the sigmoid, which is then exactly 0 (as on GPUs).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def slack_for(dtype):
    return 1e-6 if dtype == torch.float32 else 1e-3


def compare(fn_ours, fn_ref, tensors, dtype):
    """Forward and every input gradient: error vs the float64 oracle <= 2x the same-dtype reference's + slack."""
    ins = [tuple(None if t is None else t.detach().clone().requires_grad_(True) for t in tensors) for _ in range(2)]
    ins.append(tuple(None if t is None else t.detach().double().requires_grad_(True) for t in tensors))
    y, yr, yo = fn_ours(*ins[0]), fn_ref(*ins[1]), fn_ref(*ins[2])
    assert y.dtype == yr.dtype and y.shape == yr.shape and y.is_contiguous()
    assert rel_err(y, yo) <= 2 * rel_err(yr, yo) + slack_for(dtype)
    g = torch.randn_like(y)
    per_input = []
    for out, i, gg in zip((y, yr, yo), ins, (g, g, g.double())):
        leaves = [t for t in i if t is not None]
        per_input.append(torch.autograd.grad(out, leaves, gg))
    for ours, ref, orc in zip(*per_input):
        assert ours.dtype == ref.dtype
        assert rel_err(ours, orc) <= 2 * rel_err(ref, orc) + slack_for(dtype), (rel_err(ours, orc), rel_err(ref, orc))
    return y, yr


GLUS = [(act.swiglu_triton, swiglu_reference), (act.geglu_triton, geglu_reference)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fns", GLUS, ids=["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(3, 5, 123), (2, 1030)])
def test_glu_forward_backward(dtype, fns, shape):
    torch.manual_seed(0)
    gate = 2.5 * torch.randn(shape, dtype=dtype)  # wide range: both tails of the activation
    up = torch.randn(shape, dtype=dtype)
    compare(*fns, (gate, up), dtype)


@pytest.mark.parametrize("fns", GLUS, ids=["swiglu", "geglu"])
def test_glu_on_halves_of_a_fused_projection(fns):
    torch.manual_seed(1)
    gu = torch.randn(4, 9, 2 * 123)
    gate, up = gu[..., :123], gu[..., 123:]
    assert not gate.is_contiguous()
    compare(*fns, (gate, up), torch.float32)


@pytest.mark.parametrize("fns", GLUS, ids=["swiglu", "geglu"])
def test_glu_fp16_rounding_matches_reference(fns):
    """The activation is rounded to fp16 before the product, like the reference: equal almost everywhere.

    GELU is compared where gate > -3 only: below, torch's 0.5 x (1 + tanh) loses digits to cancellation and the
    kernel's x * sigmoid(2z) form is the more accurate one (checked against float64 on the whole range)."""
    torch.manual_seed(2)
    gate, up = 3 * torch.randn(64, 123, dtype=torch.float16), torch.randn(64, 123, dtype=torch.float16)
    ours, ref = fns[0](gate, up), fns[1](gate, up)
    region = gate > -3 if fns[0] is act.geglu_triton else torch.ones_like(gate, dtype=torch.bool)
    assert (ours != ref)[region].float().mean().item() < 0.01
    exact = fns[1](gate.double(), up.double())
    assert rel_err(ours, exact) <= 1.01 * rel_err(ref, exact)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 123), (70, 40)])
def test_gelu_tanh_bias_forward_backward(dtype, with_bias, shape):
    torch.manual_seed(3)
    x = 2.5 * torch.randn(shape, dtype=dtype)
    bias = torch.randn(shape[-1], dtype=dtype) if with_bias else None
    compare(act.gelu_tanh_bias_triton, gelu_tanh_bias_reference, (x, bias), dtype)


@pytest.mark.parametrize("with_bias", [True, False])
def test_gelu_tanh_bias_backward_several_row_tiles_per_program(with_bias):
    torch.manual_seed(4)
    x = 2 * torch.randn(301, 123)
    bias = torch.randn(123) if with_bias else None
    dy = torch.randn(301, 123)
    dx, db = act.gelu_bias_backward(dy, x, bias, tile=256, block_n=64, programs_per_sm=1)
    xo = x.double().requires_grad_(True)
    bo = None if bias is None else bias.double().requires_grad_(True)
    leaves = [t for t in (xo, bo) if t is not None]
    grads = torch.autograd.grad(gelu_tanh_bias_reference(xo, bo), leaves, dy.double())
    assert rel_err(dx, grads[0]) < 1e-5
    if with_bias:
        assert rel_err(db, grads[1]) < 1e-5
    else:
        assert db is None


def test_strided_launch_parameters():
    """Tile overrides (several row tiles, partial column blocks) give the same result as the defaults."""
    torch.manual_seed(5)
    g, u = torch.randn(33, 123), torch.randn(33, 123)
    y1 = act.glu_forward(g, u, act.SILU)
    y2 = act.glu_forward(g, u, act.SILU, tile=128, block_n=32)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    d1 = act.glu_backward(torch.ones_like(g), g, u, act.GELU_TANH)
    d2 = act.glu_backward(torch.ones_like(g), g, u, act.GELU_TANH, tile=128, block_n=32)
    for a, b in zip(d1, d2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


PACKED = [(act.swiglu_packed_triton, swiglu_reference), (act.geglu_packed_triton, geglu_reference)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fns", PACKED, ids=["swiglu_packed", "geglu_packed"])
@pytest.mark.parametrize("shape", [(3, 5, 246), (1000, 2 * 123)])
def test_packed_glu_forward_backward_writes_one_gradient(dtype, fns, shape):
    """act(gu[..., :I]) * gu[..., I:] on one fused gate+up tensor: values and its single [.., 2I] gradient."""
    ours, ref = fns
    torch.manual_seed(1)
    gu = 2.5 * torch.randn(shape, dtype=dtype)
    compare(ours, lambda t: ref(*t.chunk(2, dim=-1)), (gu,), dtype)
    x = gu.clone().requires_grad_(True)
    y = ours(x)
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    (g,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert g.shape == x.shape and g.is_contiguous()


def test_packed_glu_rejects_odd_width():
    with pytest.raises(ValueError, match="even"):
        act.swiglu_packed_triton(torch.randn(4, 7))
