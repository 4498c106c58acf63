"""Triton rotary position embedding (transformers' ``rotate_half`` convention) for q and k in one launch.

For x = [x1, x2] (the two halves of a head), cos = [c1, c2], sin = [s1, s2]:

    forward:   o1 = x1*c1 - x2*s1        o2 = x2*c2 + x1*s2          (= x*cos + rotate_half(x)*sin)
    backward:  d1 = g1*c1 + g2*s2        d2 = g2*c2 - g1*s1          (the transpose: rotation by -sin)

computed in fp32 and rounded once. q [B, Hq, S, D] and k [B, Hkv, S, D] may have any strides (typically the
transposed views of the projections' [B, S, H, D] outputs); cos/sin are [B or 1, S, D] (any strides). No input
is copied. One program rotates a [BLOCK_S tokens, all heads, D] tile of q and of k, so cos/sin are read once per
token.

Outputs keep the input's memory layout when the input is dense (a transposed [B, S, H, D] buffer stays one, which
is what the projections wrote and what the attention kernels read), and are [B, S, H, D] buffers seen as
[B, H, S, D] otherwise. cos/sin get no gradient (the models compute them from buffers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import fast_launch


@triton.jit
def _rotate_heads(
    IN, OUT, b, s, n_heads, half,
    sib, sih, sis, sid,
    sob, soh, sos, sod,
    s_mask, c1, c2, s1, s2,
    BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rotate a [BLOCK_S, BLOCK_H, BLOCK_D] tile (tokens x heads x half head-dim); c*/s* are [BLOCK_S, 1, BLOCK_D]."""
    h = tl.arange(0, BLOCK_H)[None, :, None]
    d = tl.arange(0, BLOCK_D)[None, None, :]
    mask = s_mask[:, None, None] & (h < n_heads) & (d < half)
    s3 = s[:, None, None]
    base_in = IN + b * sib + s3 * sis + h * sih
    base_out = OUT + b * sob + s3 * sos + h * soh
    x1 = tl.load(base_in + d * sid, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base_in + (d + half) * sid, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        o1 = x1 * c1 + x2 * s2
        o2 = x2 * c2 - x1 * s1
    else:
        o1 = x1 * c1 - x2 * s1
        o2 = x2 * c2 + x1 * s2
    tl.store(base_out + d * sod, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(base_out + (d + half) * sod, o2.to(OUT.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN,
    sqb, sqh, sqs, sqd,
    skb, skh, sks, skd,
    sqob, sqoh, sqos, sqod,
    skob, skoh, skos, skod,
    scb, scs, scd,
    ssb, sss, ssd,
    seq_len, n_q_heads, n_kv_heads, half,
    BACKWARD: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    s_mask = s < seq_len
    s = s.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    cs_mask = s_mask[:, None] & (d < half)[None, :]
    cbase = COS + b * scb + s[:, None] * scs
    sbase = SIN + b * ssb + s[:, None] * sss
    c1 = tl.load(cbase + d[None, :] * scd, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    c2 = tl.load(cbase + (d[None, :] + half) * scd, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    s1 = tl.load(sbase + d[None, :] * ssd, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    s2 = tl.load(sbase + (d[None, :] + half) * ssd, mask=cs_mask, other=0.0).to(tl.float32)[:, None, :]
    _rotate_heads(Q, QO, b, s, n_q_heads, half, sqb, sqh, sqs, sqd, sqob, sqoh, sqos, sqod,
                  s_mask, c1, c2, s1, s2, BACKWARD, BLOCK_HQ, BLOCK_D)
    _rotate_heads(K, KO, b, s, n_kv_heads, half, skb, skh, sks, skd, skob, skoh, skos, skod,
                  s_mask, c1, c2, s1, s2, BACKWARD, BLOCK_HKV, BLOCK_D)


def _out_like(t: torch.Tensor) -> torch.Tensor:
    """Same memory layout as ``t`` when t is dense, else a [B, S, H, D] buffer viewed as [B, H, S, D]."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))  # outermost dimension first
    if t.permute(order).is_contiguous():
        buf = torch.empty([t.shape[i] for i in order], dtype=t.dtype, device=t.device)
        return buf.permute([order.index(i) for i in range(t.dim())])
    b, h, s, d = t.shape
    return torch.empty((b, s, h, d), dtype=t.dtype, device=t.device).transpose(1, 2)


def _batch_stride(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def rope_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool,
    *,
    block_s: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (or their gradients when ``backward``) into new tensors."""
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    if D % 2:
        raise ValueError(f"head_dim must be even, got {D}")
    if k.shape[0] != B or k.shape[2] != S or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.shape[0] not in (1, B) or cos.shape[1] != S or cos.shape[2] != D or sin.shape != cos.shape:
        raise ValueError(f"cos/sin of shape {tuple(cos.shape)} do not match q {tuple(q.shape)}")
    qo, ko = _out_like(q), _out_like(k)
    if q.numel() == 0:
        return qo, ko
    half = D // 2
    block_hq, block_hkv = triton.next_power_of_2(Hq), triton.next_power_of_2(Hkv)
    block_d = triton.next_power_of_2(half)
    if block_s is None:  # about 4096 elements of q per half-tile (fewer programs in the CPU interpreter)
        target = 4096 if q.is_cuda else 16384
        block_s = max(1, min(triton.next_power_of_2(S), target // (block_hq * block_d)))
    if num_warps is None:
        tile = block_s * block_hq * block_d
        num_warps = 2 if tile <= 256 else 4 if tile <= 2048 else 8
    grid = (triton.cdiv(S, block_s), B)
    _rope_kernel[grid](
        q, k, qo, ko, cos, sin,
        *q.stride(), *k.stride(), *qo.stride(), *ko.stride(),
        _batch_stride(cos), cos.stride(1), cos.stride(2),
        _batch_stride(sin), sin.stride(1), sin.stride(2),
        S, Hq, Hkv, half,
        BACKWARD=backward, BLOCK_S=block_s, BLOCK_HQ=block_hq, BLOCK_HKV=block_hkv, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return qo, ko


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        qo, ko = rope_launch(q, k, cos, sin, backward=False)
        ctx.save_for_backward(cos, sin)
        ctx.q_shape, ctx.k_shape = q.shape, k.shape
        return qo, ko

    @staticmethod
    def backward(ctx, dq: torch.Tensor | None, dk: torch.Tensor | None):
        cos, sin = ctx.saved_tensors
        if dq is None or dk is None:  # one output unused: a zero gradient for it (rare; never in attention)
            ref = dq if dq is not None else dk
            if dq is None:
                dq = torch.zeros(ctx.q_shape, dtype=ref.dtype, device=ref.device)
            if dk is None:
                dk = torch.zeros(ctx.k_shape, dtype=ref.dtype, device=ref.device)
        gq, gk = rope_launch(dq, dk, cos, sin, backward=True)
        return gq, gk, None, None


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q*cos + rotate_half(q)*sin, k*cos + rotate_half(k)*sin) for q [B,Hq,S,D], k [B,Hkv,S,D], cos/sin [B|1,S,D]."""
    return RopeFunction.apply(q, k, cos, sin)
