"""Triton tensorwise float8 quantization (`litespark_kernels.ops.fp8.quantize_reference` is the specification).

Two launches: ``_amax`` (each program reduces ``BLOCK_R`` rows, one float32 ``atomic_max`` per program, into a zeroed
one-element buffer), then ``_scaled_cast``, where each program scales, clamps and casts a [BLOCK_R, BLOCK_C] tile
once and writes it to ``q`` [R', C] and, when asked, transposed to ``qt`` [C, R'] (rows past R, the padding up to R',
are zeros). The transposed copy loads the tile a second time in transposed order rather than ``tl.trans`` the
scaled tile: on the H200 (Triton 3.6) the ``tl.trans`` version wrote wrong bytes into some rows of ``qt`` for float32
inputs (1000 x 123 and 3072 x 2048; bf16 inputs and 8192 x 2048 were right), seen by the bitwise GPU test. The scale is ``fmax / max(amax, eps)`` with IEEE division (``div_rn``), as torch computes it, so both
paths give the same bits; the cast rounds to nearest and saturates (the reference clamps, then casts).

A NaN in the input: torch's amax is NaN (every output NaN); here the max skips it, and only that element is NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import fast_launch

from .fp8 import AMAX_EPS, padded


@fast_launch
@triton.jit
def _amax(X, AMAX, R, C, sxr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)[None, :]
        x = tl.load(X + r * sxr + c, mask=(r < R) & (c < C), other=0.0).to(tl.float32)
        acc = tl.maximum(acc, tl.abs(x))
    tl.atomic_max(AMAX, tl.max(tl.max(acc, axis=1), axis=0))


@fast_launch
@triton.jit
def _scaled_cast(X, AMAX, Q, QT, INV, R, C, R_PAD, sxr, FMAX: tl.constexpr, EPS: tl.constexpr,
                 WRITE_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    amax = tl.maximum(tl.load(AMAX), EPS)
    scale = tl.math.div_rn(FMAX, amax)
    if (pid_r == 0) & (pid_c == 0):
        tl.store(INV, tl.math.div_rn(1.0, scale))
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cc = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r = rr[:, None]
    c = cc[None, :]
    x = tl.load(X + r * sxr + c, mask=(r < R) & (c < C), other=0.0).to(tl.float32)
    y = tl.clamp(x * scale, -FMAX, FMAX)
    tl.store(Q + r * C + c, y.to(Q.dtype.element_ty), mask=(r < R_PAD) & (c < C))
    if WRITE_T:  # the tile loaded again in transposed order (from L1/L2), so each write to QT is row-contiguous
        ct = cc[:, None]
        rt = rr[None, :]
        xt = tl.load(X + rt * sxr + ct, mask=(rt < R) & (ct < C), other=0.0).to(tl.float32)
        yt = tl.clamp(xt * scale, -FMAX, FMAX)
        tl.store(QT + ct * R_PAD + rt, yt.to(QT.dtype.element_ty), mask=(ct < C) & (rt < R_PAD))


def quantize_triton(t: torch.Tensor, dtype: torch.dtype, pad_rows_to: int = 1, transposed: bool = False,
                    buffer_dtype: torch.dtype | None = None):
    """`quantize_reference` in two launches. ``buffer_dtype`` (tests in Triton's CPU interpreter, whose float8 casts
    are not faithful): the dtype ``q``/``qt`` are written in instead of ``dtype`` (the values then are the scaled,
    clamped float32 ones before the cast)."""
    R, C = t.shape
    r_pad = padded(R, pad_rows_to)
    out_dtype = buffer_dtype or dtype
    amax = torch.zeros(1, dtype=torch.float32, device=t.device)
    block_c_amax = min(256, triton.next_power_of_2(max(C, 16)))
    _amax[(triton.cdiv(R, 16),)](t, amax, R, C, t.stride(0), BLOCK_R=16, BLOCK_C=block_c_amax)
    q = torch.empty(r_pad, C, dtype=out_dtype, device=t.device)
    qt = torch.empty(C, r_pad, dtype=out_dtype, device=t.device) if transposed else None
    inv = torch.empty(1, dtype=torch.float32, device=t.device)
    block_r, block_c = 64, 64
    grid = (triton.cdiv(r_pad, block_r), triton.cdiv(C, block_c))
    _scaled_cast[grid](t, amax, q, qt if qt is not None else q, inv, R, C, r_pad, t.stride(0),
                       FMAX=torch.finfo(dtype).max, EPS=AMAX_EPS, WRITE_T=transposed, BLOCK_R=block_r,
                       BLOCK_C=block_c, num_warps=4)
    return q, qt, inv
