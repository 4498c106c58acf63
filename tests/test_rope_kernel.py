"""RoPE Triton kernel against ``apply_rope_reference`` (Triton CPU interpreter, fp32 and fp16).

q/k as the models produce them (transposed views of [B, S, H, D]) and as contiguous [B, H, S, D]; sequence 1000,
GQA head counts, a head dim whose half is not a power of two, cos/sin shared over the batch or per batch, and
cos/sin whose halves differ (the general rotate_half formula, forward and backward).
"""

import math

import pytest
import torch

from litespark_kernels.ops._rope_triton import apply_rope_triton, rope_launch
from litespark_kernels.ops.rope import apply_rope_reference


def rel_err(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm()).item()


def rotary(batch, seq, dim, dtype, per_batch=False):
    """cos/sin as transformers' rotary embedding builds them (duplicated halves), positions offset per batch."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    offsets = torch.arange(batch if per_batch else 1, dtype=torch.float64)[:, None] * 17
    pos = torch.arange(seq, dtype=torch.float64)[None, :] + offsets
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_qk(B, Hq, Hkv, S, D, dtype, layout):
    torch.manual_seed(0)
    if layout == "bshd":  # what the projections produce, transposed to [B, H, S, D]
        q = torch.randn(B, S, Hq, D, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, dtype=dtype).transpose(1, 2)
    elif layout == "fused":  # q and k slices of one fused projection: non-dense views
        qk = torch.randn(B, S, (Hq + Hkv) * D, dtype=dtype)
        q = qk[..., : Hq * D].view(B, S, Hq, D).transpose(1, 2)
        k = qk[..., Hq * D :].view(B, S, Hkv, D).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, S, D, dtype=dtype)
        k = torch.randn(B, Hkv, S, D, dtype=dtype)
    return q, k


def run_and_compare(q, k, cos, sin, dtype):
    leaves = [tuple(t.detach().clone().requires_grad_(True) for t in (q, k)) for _ in range(2)]
    leaves.append(tuple(t.detach().double().requires_grad_(True) for t in (q, k)))
    qo, ko = apply_rope_triton(*leaves[0], cos, sin)
    qr, kr = apply_rope_reference(*leaves[1], cos, sin)
    qd, kd = apply_rope_reference(*leaves[2], cos.double(), sin.double())
    assert qo.shape == q.shape and ko.shape == k.shape and qo.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for ours, ref, orc in ((qo, qr, qd), (ko, kr, kd)):
        assert rel_err(ours, orc) <= 2 * rel_err(ref, orc) + tol
    gq, gk = torch.randn_like(qo), torch.randn_like(ko)
    ours = torch.autograd.grad((qo, ko), leaves[0], (gq, gk))
    ref = torch.autograd.grad((qr, kr), leaves[1], (gq, gk))
    orc = torch.autograd.grad((qd, kd), leaves[2], (gq.double(), gk.double()))
    for a, b, c in zip(ours, ref, orc):
        assert a.dtype == dtype
        assert rel_err(a, c) <= 2 * rel_err(b, c) + tol
    return qo, ko


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_rope_seq_1000(dtype, layout):
    B, Hq, Hkv, S, D = 2, 4, 2, 1000, 16
    q, k = make_qk(B, Hq, Hkv, S, D, dtype, layout)
    cos, sin = rotary(1, S, D, dtype)
    qo, ko = run_and_compare(q, k, cos, sin, dtype)
    assert qo.stride() == q.stride() and ko.stride() == k.stride()  # dense inputs keep their layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope_odd_heads_and_head_dim_per_batch_cos(dtype):
    B, Hq, Hkv, S, D = 3, 6, 3, 37, 24  # half = 12: not a power of two
    q, k = make_qk(B, Hq, Hkv, S, D, dtype, "bshd")
    cos, sin = rotary(B, S, D, dtype, per_batch=True)
    run_and_compare(q, k, cos, sin, dtype)


def test_rope_fused_projection_views():
    B, Hq, Hkv, S, D = 2, 4, 1, 33, 32
    q, k = make_qk(B, Hq, Hkv, S, D, torch.float32, "fused")
    cos, sin = rotary(1, S, D, torch.float32)
    qo, _ = run_and_compare(q, k, cos, sin, torch.float32)
    assert qo.transpose(1, 2).is_contiguous()  # non-dense input: a [B, S, H, D] buffer


def test_rope_general_cos_sin_and_backward_is_transpose():
    """Random cos/sin (halves differ): forward matches the reference and backward is its exact transpose."""
    torch.manual_seed(5)
    B, Hq, Hkv, S, D = 2, 3, 1, 11, 8
    q, k = make_qk(B, Hq, Hkv, S, D, torch.float64, "bhsd")
    q, k = q.float(), k.float()
    cos, sin = torch.randn(B, S, D), torch.randn(B, S, D)
    run_and_compare(q, k, cos, sin, torch.float32)
    # <R x, y> == <x, R^T y>
    y_q, y_k = torch.randn_like(q), torch.randn_like(k)
    rq, rk = rope_launch(q, k, cos, sin, backward=False)
    tq, tk = rope_launch(y_q, y_k, cos, sin, backward=True)
    lhs = (rq * y_q).sum() + (rk * y_k).sum()
    rhs = (q * tq).sum() + (k * tk).sum()
    assert math.isclose(lhs.item(), rhs.item(), rel_tol=1e-5, abs_tol=1e-4)


def test_rope_block_s_tail():
    """Several tokens per program with a sequence that is not a multiple of the block."""
    B, Hq, Hkv, S, D = 1, 2, 1, 13, 8
    q, k = make_qk(B, Hq, Hkv, S, D, torch.float32, "bshd")
    cos, sin = rotary(1, S, D, torch.float32)
    qo, ko = rope_launch(q, k, cos, sin, backward=False, block_s=4)
    qr, kr = apply_rope_reference(q, k, cos, sin)
    torch.testing.assert_close(qo, qr)
    torch.testing.assert_close(ko, kr)
