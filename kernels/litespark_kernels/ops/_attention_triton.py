"""Triton attention, forward and backward (FlashAttention-2 style; Dao 2023, arXiv:2307.08691).

Same function as ``attention.attention_reference`` (read its docstring for the semantics): GQA without repeating
k/v, bottom-right-aligned causality, sliding window, int32 segment ids for padding and packed documents, and
attention logit soft-capping (Gemma-2: s -> cap * tanh(s / cap) on the scaled scores, before the mask).

Forward, one program per (query block, batch * query head): online softmax over key blocks in fp32 with the scale
folded into ``exp2`` (s2 = <q, k> * scale * log2(e)); stores the output directly as [B, Sq, Hq, D] and the
base-2 log-sum-exp L2 = m + log2(l) per row for the backward (+inf for a row with no visible key, so that every
recomputed probability of that row is 0).

Backward: a preprocess kernel computes delta_i = sum_d dO[i, d] * O[i, d]; one kernel per (key block,
batch * kv head) loops over the G query heads of its group and accumulates dK and dV in registers (no atomics, no
repeat_kv); a second kernel per (query block, batch * query head) accumulates dQ:
    P = exp2(S2 - L2),  dV += P^T dO,  dP = dO V^T,  dS = P * (dP - delta),  dK += scale * dS^T Q,  dQ += scale * dS K.

Soft-capping (``SOFTCAP``, a constexpr: the path without it compiles as before): the kernels turn the unscaled score
into t = tanh(scale * <q, k> / cap) right after the product and use S2 = t * cap * log2(e) (the cap applies to the
natural-scale score, before any log2(e) factor); the backward recomputes t the same way and multiplies dS by
d(cap * t) / d(scale * <q, k>) = 1 - t^2 (folded into P right after the mask, so that no extra tile stays live
across the products). Nothing extra is stored.

Work skipping: key blocks that no row of a query block may see are never visited. Causality and the window give
the visited range directly; segment ids give a conservative one (``_segment_range_kernel``: the first and last
key whose id lies within the query block's [min id, max id], which is exact for packed documents and still correct
for any ids). Only blocks that straddle the causal diagonal, the window's edge or the sequence end apply the
positional mask elementwise; the segment mask, when given, is applied to every visited block, unless
``SEGMENT_FULL_BLOCKS`` (experimental): then a block whose rows all belong to one document that covers the whole block
of the other side (the range kernel's [flo, fhi), e.g. the interior of a packed document) is not masked either.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from .._launch import fast_launch

from .._dispatch import interpreting

_LOG2E = math.log2(math.e)

# Hand-picked launch configurations (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT), keyed by kernel and padded head
# dim (80 and 96 use the 128 entries; 256 its own). fwd and dq: BLOCK_M query rows per program, BLOCK_N keys per step; dkv: BLOCK_N
# keys per program, BLOCK_M query rows per step. SPLIT: three specialised loops (masked / unmasked / masked) instead of
# one loop that masks through a runtime branch (fewer registers). Chosen from timings on an H100 with triton 3.6
# (benchmarks/bench_attention.py --sweep; benchmarks/NOTES.md, "Attention").
CONFIGS: dict[tuple[str, int], tuple[int, int, int, int, bool]] = {
    ("fwd", 64): (128, 64, 8, 3, False),
    ("fwd", 128): (128, 128, 8, 3, False),
    ("dkv", 64): (64, 128, 8, 3, True),
    ("dkv", 128): (64, 64, 4, 2, False),
    ("dq", 64): (128, 64, 8, 3, False),
    ("dq", 128): (128, 64, 8, 3, True),
    # head dim 256 (Gemma 2/3): smaller tiles and fewer stages (shared memory: a [64, 256] k or v tile is 32 KiB per
    # stage; dK/dV hold two [64, 256] fp32 accumulators). The configurations of session 8's H200 GPU tests and
    # gemma2-1b bench; devices with more shared memory take LARGE_SMEM_CONFIGS below.
    ("fwd", 256): (64, 64, 4, 2, False),
    ("dkv", 256): (64, 64, 8, 1, False),
    ("dq", 256): (64, 64, 8, 2, False),
}
# Where a block may use >= LARGE_SMEM_BYTES of shared memory (H100/H200: 227 KiB; A100: 163 KiB; sm89: 99 KiB): the
# head-dim-256 forward and dQ with 128 query rows per program (a [128, 256] q tile is 64 KiB). Timed faster by the
# H200 sweep (benchmarks/NOTES.md, session 8: forward 422 vs 318 TFLOP/s, dQ 0.84 vs 1.05 ms) and run through the GPU
# tests on the H200 in session 10 (test_head_dim_256_configs).
LARGE_SMEM_BYTES = 200 * 1024
LARGE_SMEM_CONFIGS: dict[tuple[str, int], tuple[int, int, int, int, bool]] = {
    ("fwd", 256): (128, 64, 8, 2, False),
    ("dq", 256): (128, 64, 8, 1, False),
}
# In Triton's CPU interpreter: small blocks, so that tiny test shapes still cross several blocks, and larger ones
# for long sequences (the interpreter's cost grows with the number of block steps).
INTERPRETER_CONFIGS = {"short": (16, 16, 4, 1, True), "long": (64, 64, 4, 1, False)}


@functools.lru_cache(maxsize=None)
def _shared_memory_per_block(device_index: int) -> int:
    """The shared memory a block may opt in to on this CUDA device, in bytes (0 when torch does not say)."""
    return int(getattr(torch.cuda.get_device_properties(device_index), "shared_memory_per_block_optin", 0))


def _config(kind: str, block_d: int, seqlen: int, device: torch.device | None = None) -> tuple[int, int, int, int, bool]:
    if interpreting():
        return INTERPRETER_CONFIGS["short" if seqlen <= 256 else "long"]
    key = (kind, 64 if block_d <= 64 else 128 if block_d <= 128 else 256)
    if key in LARGE_SMEM_CONFIGS and device is not None and device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if _shared_memory_per_block(index) >= LARGE_SMEM_BYTES:
            return LARGE_SMEM_CONFIGS[key]
    return CONFIGS[key]


# ----------------------------------------------------------------------------------------------------------------
# Visited ranges
# ----------------------------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _segment_range_kernel(
    row_seg, col_seg, lo_ptr, hi_ptr, flo_ptr, fhi_ptr, n_rows, n_cols, stride_rb, stride_cb, n_blocks,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, FULL: tl.constexpr,
):
    """For each block of BLOCK rows: [first, last + 1) over the columns whose segment id lies in the block's
    [min, max] of non-negative row ids; (2**30, 0) when no column can match. With FULL, also [flo, fhi): columns
    that every row of the block may see by segment, i.e. the block's rows all carry one id s >= 0 (rows past n_rows
    count as padding) and every column in [first, last] carries s too (counted: a contiguous run); else (0, 0)."""
    blk = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    r = tl.load(row_seg + b * stride_rb + offs, mask=offs < n_rows, other=-1)
    rmin = tl.min(tl.where(r >= 0, r, 1 << 30), axis=0)
    rmax = tl.max(r, axis=0)
    first = tl.zeros([], dtype=tl.int32) + (1 << 30)
    last = tl.zeros([], dtype=tl.int32) - 1
    count = tl.zeros([], dtype=tl.int32)
    for c0 in range(0, n_cols, CHUNK):
        offs_c = c0 + tl.arange(0, CHUNK)
        c = tl.load(col_seg + b * stride_cb + offs_c, mask=offs_c < n_cols, other=-1)
        hit = (c >= rmin) & (c <= rmax)
        first = tl.minimum(first, tl.min(tl.where(hit, offs_c, 1 << 30), axis=0))
        last = tl.maximum(last, tl.max(tl.where(hit, offs_c, -1), axis=0))
        if FULL:
            count += tl.sum(hit.to(tl.int32), axis=0)
    tl.store(lo_ptr + b * n_blocks + blk, first)
    tl.store(hi_ptr + b * n_blocks + blk, last + 1)
    if FULL:
        uniform = (tl.min(r, axis=0) == rmax) & (rmax >= 0) & (count == last + 1 - first)
        tl.store(flo_ptr + b * n_blocks + blk, tl.where(uniform, first, 0))
        tl.store(fhi_ptr + b * n_blocks + blk, tl.where(uniform, last + 1, 0))


def _segment_ranges(
    row_seg: torch.Tensor, col_seg: torch.Tensor, block: int, full: bool = False
) -> tuple[torch.Tensor, ...]:
    """int32 [B, cdiv(rows, block)] lo and hi: columns outside [lo, hi) cannot match any row of the block; with
    ``full``, also flo and fhi: every row of the block matches every column in [flo, fhi) (else flo, fhi = lo, hi,
    never read)."""
    B, n_rows = row_seg.shape
    n_cols = col_seg.shape[1]
    n_blocks = triton.cdiv(n_rows, block)
    lo = torch.empty(B, n_blocks, dtype=torch.int32, device=row_seg.device)
    hi = torch.empty_like(lo)
    flo, fhi = (torch.empty_like(lo), torch.empty_like(lo)) if full else (lo, hi)
    chunk = 64 if interpreting() else 1024
    _segment_range_kernel[(n_blocks, B)](
        row_seg, col_seg, lo, hi, flo, fhi, n_rows, n_cols, row_seg.stride(0), col_seg.stride(0), n_blocks,
        BLOCK=block, CHUNK=chunk, FULL=full, num_warps=4,
    )
    return lo, hi, flo, fhi


@triton.jit
def _kv_range_of_q_block(
    m0, Sq, Skv, window, seg_lo_ptr, seg_hi_ptr, seg_flo_ptr, seg_fhi_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
    SEG_FULL: tl.constexpr,
):
    """Key range visited by query rows [m0, m0 + BLOCK_M): masked [lo, ulo), unmasked [ulo, uhi), masked [uhi, hi).
    lo, ulo and uhi are multiples of BLOCK_N. Unmasked means by position; with SEG_FULL also by segment ([ulo, uhi)
    is cut to the keys every row's segment sees)."""
    offset = Skv - Sq  # query i sits at key position i + offset
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + Skv
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + offset)
    if WINDOW:
        lo = tl.maximum(lo, m0 + offset - window + 1)
    if HAS_SEG:
        lo = tl.maximum(lo, tl.load(seg_lo_ptr))
        hi = tl.minimum(hi, tl.load(seg_hi_ptr))
    lo = tl.minimum(lo, Skv)
    lo = (lo // BLOCK_N) * BLOCK_N
    # Blocks in which every (row, key) is visible by position: no elementwise positional mask.
    ulo = lo
    if WINDOW:
        ulo = tl.maximum(ulo, m0 + BLOCK_M + offset - window)
    ulo = tl.minimum(ulo, Skv)
    ulo = ((ulo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    uhi = tl.minimum(hi, Skv)
    if CAUSAL:
        uhi = tl.minimum(uhi, m0 + offset + 1)
    if SEG_FULL:
        ulo = tl.maximum(ulo, ((tl.load(seg_flo_ptr) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
        uhi = tl.minimum(uhi, tl.load(seg_fhi_ptr))
    uhi = tl.maximum(uhi, 0)
    uhi = (uhi // BLOCK_N) * BLOCK_N
    uhi = tl.maximum(uhi, ulo)
    return lo, ulo, uhi, hi


@triton.jit
def _q_range_of_kv_block(
    n0, Sq, Skv, window, seg_lo_ptr, seg_hi_ptr, seg_flo_ptr, seg_fhi_ptr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
    SEG_FULL: tl.constexpr,
):
    """Query range that sees keys [n0, n0 + BLOCK_N): masked [lo, ulo), unmasked [ulo, uhi), masked [uhi, hi).
    lo, ulo and uhi are multiples of BLOCK_M (unmasked: as in ``_kv_range_of_q_block``)."""
    offset = Skv - Sq
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + Sq
    if CAUSAL:
        lo = tl.maximum(lo, n0 - offset)  # rows i with i + offset >= n0
    if WINDOW:
        hi = tl.minimum(hi, n0 + BLOCK_N - 1 + window - offset)  # rows i with i + offset - (n0+BN-1) < window
    if HAS_SEG:
        lo = tl.maximum(lo, tl.load(seg_lo_ptr))
        hi = tl.minimum(hi, tl.load(seg_hi_ptr))
    lo = tl.minimum(lo, Sq)
    lo = (lo // BLOCK_M) * BLOCK_M
    ulo = lo
    if CAUSAL:
        ulo = tl.maximum(ulo, n0 + BLOCK_N - 1 - offset)
    ulo = tl.minimum(ulo, Sq)
    ulo = ((ulo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    uhi = tl.minimum(hi, Sq)
    if WINDOW:
        uhi = tl.minimum(uhi, n0 + window - offset)
    if SEG_FULL:
        ulo = tl.maximum(ulo, ((tl.load(seg_flo_ptr) + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
        uhi = tl.minimum(uhi, tl.load(seg_fhi_ptr))
    uhi = tl.maximum(uhi, 0)
    uhi = (uhi // BLOCK_M) * BLOCK_M
    uhi = tl.maximum(uhi, ulo)
    return lo, ulo, uhi, hi


@triton.jit
def _visible(
    qi, kj, q_seg, kv_seg, Sq, Skv, window,
    POSITIONAL: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
):
    """Visibility of keys kj from query rows qi, both given as broadcastable 2D index tiles (rows x keys or keys x
    rows), as are q_seg and kv_seg; the positional part (bounds, causality, window) only when POSITIONAL."""
    vis = kj < Skv
    if POSITIONAL:
        qpos = qi + (Skv - Sq)
        vis = vis & (qi < Sq)
        if CAUSAL:
            vis = vis & (kj <= qpos)
        if WINDOW:
            vis = vis & (qpos - kj < window)
    if HAS_SEG:
        vis = vis & (q_seg == kv_seg) & (kv_seg >= 0)
    return vis


@triton.jit
def _visible_outside(
    offs_m, offs_n, q_seg, kvseg_base, Sq, Skv, window,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
):
    """Visibility of a [queries, keys] block outside the unmasked range of a one-loop (mode 2) forward or dQ loop:
    by position, and with segment ids (which reach mode 2 only with SEG_FULL) by segment too."""
    if HAS_SEG:
        kv_seg = tl.load(kvseg_base + offs_n, mask=offs_n < Skv, other=-1)
        vis = _visible(offs_m[:, None], offs_n[None, :], q_seg[:, None], kv_seg[None, :], Sq, Skv, window,
                       True, CAUSAL, WINDOW, True)
    else:
        vis = _visible(offs_m[:, None], offs_n[None, :], q_seg, q_seg, Sq, Skv, window, True, CAUSAL, WINDOW, False)
    return vis


@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero past n_rows (when CHECK_ROWS) and past HEAD_DIM."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _tanh(x2):
    """(t, r) with t = tanh(x) and r = 1 - |t| = 2 / (2^|x2| + 1), from x2 = 2 * log2(e) * x (the factor is folded
    into ``tanh_scale``). Exact limits for large |x| (2^|x2| overflows to inf: r = 0, |t| = 1); r keeps its relative
    precision there, so the backward's 1 - t^2 = r * (2 - r) has no cancellation."""
    r = 2.0 / (tl.exp2(tl.abs(x2)) + 1.0)
    t = tl.where(x2 < 0.0, r - 1.0, 1.0 - r)
    return t, r


# MASK_MODE of the inner loops: 0 = no positional mask (blocks fully visible by position), 1 = positional mask on
# every block, 2 = one loop over the whole range that masks only the blocks outside [ulo, uhi) (a runtime branch;
# fewer registers than three specialised loops).


# ----------------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
    start, end, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
    SOFTCAP: tl.constexpr, SEG_FULL: tl.constexpr,
):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Skv, offs_d,
                       MASK_MODE != 0, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k))  # unscaled scores; the scale is folded into the exp2 argument below
        if SOFTCAP:
            s, _ = _tanh(s * tanh_scale)  # t = tanh(scale * s / cap); qk_scale is then cap * log2(e)
        if (HAS_SEG and not SEG_FULL) or MASK_MODE == 1:
            kv_seg = q_seg
            if HAS_SEG:
                kv_seg = tl.load(kvseg_base + offs_n, mask=offs_n < Skv, other=-1)
            vis = _visible(offs_m[:, None], offs_n[None, :], q_seg[:, None], kv_seg[None, :], Sq, Skv, window,
                           MASK_MODE != 0, CAUSAL, WINDOW, HAS_SEG)
            s = tl.where(vis, s, float("-inf"))
        elif MASK_MODE == 2:
            if (n0 < ulo) | (n0 >= uhi):
                vis = _visible_outside(offs_m, offs_n, q_seg, kvseg_base, Sq, Skv, window, CAUSAL, WINDOW, HAS_SEG)
                s = tl.where(vis, s, float("-inf"))
        # Running max m_i in scaled (log2) units. alpha from an exact difference: with m_i = m_new it is exactly 1,
        # also for rows still at the -1e30 start value (a fused m_i * c - m_new * c would leave a rounding error of
        # ~1e22 there, and exp2 of it overflows).
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, Skv, offs_d,
                       MASK_MODE != 0, HEAD_DIM, BLOCK_D)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@fast_launch
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, QSEG, KVSEG, SEG_LO, SEG_HI, SEG_FLO, SEG_FHI,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_om, stride_oh,
    stride_qsb, stride_ksb,
    Hq, G, Sq, Skv, window, qk_scale, tanh_scale, n_m_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SPLIT: tl.constexpr,
    SOFTCAP: tl.constexpr, SEG_FULL: tl.constexpr,
):
    bh = tl.program_id(0)
    m_blk = n_m_blocks - 1 - tl.program_id(1)  # heaviest (last) query blocks first under causality
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    b64 = b.to(tl.int64)
    m0 = m_blk * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   offs_m, Sq, offs_d, True, HEAD_DIM, BLOCK_D)
    q_seg = offs_m
    if HAS_SEG:
        q_seg = tl.load(QSEG + b64 * stride_qsb + offs_m, mask=offs_m < Sq, other=-1)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    kvseg_base = KVSEG + b64 * stride_ksb

    lo, ulo, uhi, hi = _kv_range_of_q_block(
        m0, Sq, Skv, window, SEG_LO + b * n_m_blocks + m_blk, SEG_HI + b * n_m_blocks + m_blk,
        SEG_FLO + b * n_m_blocks + m_blk, SEG_FHI + b * n_m_blocks + m_blk,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_SEG, SEG_FULL,
    )
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPLIT:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            lo, tl.minimum(ulo, hi), ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 1, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            ulo, uhi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 0, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            uhi, hi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 1, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
    else:
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            lo, hi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 2, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * Sq + offs_m, lse, mask=offs_m < Sq)
    o_ptrs = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM))


# ----------------------------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _bwd_delta_kernel(
    O, DO, DELTA, stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, Hq, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d] in fp32."""
    bh = tl.program_id(0)
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Sq + offs_m, delta, mask=offs_m < Sq)


@triton.jit
def _bwd_dkv_inner(
    dk, dv, k, v, kv_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, qseg_base,
    stride_qm, stride_dom, start, end, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
    BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
    SOFTCAP: tl.constexpr, SEG_FULL: tl.constexpr,
):
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_rows(q_base + offs_m[:, None] * stride_qm + offs_d[None, :], offs_m, Sq, offs_d,
                       MASK_MODE != 0, HEAD_DIM, BLOCK_D)
        if MASK_MODE != 0:
            lse = tl.load(lse_base + offs_m, mask=offs_m < Sq, other=float("inf"))
        else:
            lse = tl.load(lse_base + offs_m)
        # Transposed tiles [BLOCK_N, BLOCK_M]: keys along rows, so dK and dV accumulate without transposes.
        s_t = tl.dot(k, tl.trans(q))
        if SOFTCAP:
            s_t, r_t = _tanh(s_t * tanh_scale)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if (HAS_SEG and not SEG_FULL) or MASK_MODE == 1:
            q_seg = offs_m
            if HAS_SEG:
                q_seg = tl.load(qseg_base + offs_m, mask=offs_m < Sq, other=-1)
            vis_t = _visible(offs_m[None, :], offs_n[:, None], q_seg[None, :], kv_seg[:, None], Sq, Skv, window,
                             MASK_MODE != 0, CAUSAL, WINDOW, HAS_SEG)
            p_t = tl.where(vis_t, p_t, 0.0)
        elif MASK_MODE == 2:
            if (m0 < ulo) | (m0 >= uhi):
                if HAS_SEG:  # SEG_FULL, as in the forward
                    q_seg = tl.load(qseg_base + offs_m, mask=offs_m < Sq, other=-1)
                    vis_t = _visible(offs_m[None, :], offs_n[:, None], q_seg[None, :], kv_seg[:, None], Sq, Skv,
                                     window, True, CAUSAL, WINDOW, True)
                else:
                    vis_t = _visible(offs_m[None, :], offs_n[:, None], offs_m, offs_m, Sq, Skv, window,
                                     True, CAUSAL, WINDOW, False)
                p_t = tl.where(vis_t, p_t, 0.0)
        pc_t = p_t
        if SOFTCAP:  # P * d(cap * t) / d(scale * s), with 1 - t^2 = r * (2 - r); r is dead from here on
            pc_t = p_t * (r_t * (2.0 - r_t))
        do = _load_rows(do_base + offs_m[:, None] * stride_dom + offs_d[None, :], offs_m, Sq, offs_d,
                        MASK_MODE != 0, HEAD_DIM, BLOCK_D)
        if MASK_MODE != 0:
            delta = tl.load(delta_base + offs_m, mask=offs_m < Sq, other=0.0)
        else:
            delta = tl.load(delta_base + offs_m)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = pc_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@fast_launch
@triton.jit
def _attn_bwd_dkv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QSEG, KVSEG, SEG_LO, SEG_HI, SEG_FLO, SEG_FHI,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_qsb, stride_ksb,
    Hq, Hkv, G, Sq, Skv, window, qk_scale, tanh_scale, sm_scale, n_n_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SPLIT: tl.constexpr,
    SOFTCAP: tl.constexpr, SEG_FULL: tl.constexpr,
):
    bhk = tl.program_id(0)
    n_blk = tl.program_id(1)  # under causality the first key blocks see the most queries: they start first
    b = bhk // Hkv
    hk = bhk % Hkv
    b64 = b.to(tl.int64)
    n0 = n_blk * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
                   offs_n, Skv, offs_d, True, HEAD_DIM, BLOCK_D)
    v = _load_rows(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
                   offs_n, Skv, offs_d, True, HEAD_DIM, BLOCK_D)
    kv_seg = offs_n
    if HAS_SEG:
        kv_seg = tl.load(KVSEG + b64 * stride_ksb + offs_n, mask=offs_n < Skv, other=-1)
    lo, ulo, uhi, hi = _q_range_of_kv_block(
        n0, Sq, Skv, window, SEG_LO + b * n_n_blocks + n_blk, SEG_HI + b * n_n_blocks + n_blk,
        SEG_FLO + b * n_n_blocks + n_blk, SEG_FHI + b * n_n_blocks + n_blk,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_SEG, SEG_FULL,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qseg_base = QSEG + b64 * stride_qsb
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b64 * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + bh.to(tl.int64) * Sq
        delta_base = DELTA + bh.to(tl.int64) * Sq
        if SPLIT:
            dk, dv = _bwd_dkv_inner(
                dk, dv, k, v, kv_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, qseg_base,
                stride_qm, stride_dom, lo, tl.minimum(ulo, hi), ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
                BLOCK_M, HEAD_DIM, BLOCK_D, 1, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
            )
            dk, dv = _bwd_dkv_inner(
                dk, dv, k, v, kv_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, qseg_base,
                stride_qm, stride_dom, ulo, uhi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
                BLOCK_M, HEAD_DIM, BLOCK_D, 0, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
            )
            dk, dv = _bwd_dkv_inner(
                dk, dv, k, v, kv_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, qseg_base,
                stride_qm, stride_dom, uhi, hi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
                BLOCK_M, HEAD_DIM, BLOCK_D, 1, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
            )
        else:
            dk, dv = _bwd_dkv_inner(
                dk, dv, k, v, kv_seg, offs_n, offs_d, q_base, do_base, lse_base, delta_base, qseg_base,
                stride_qm, stride_dom, lo, hi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
                BLOCK_M, HEAD_DIM, BLOCK_D, 2, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
            )
    dk = dk * sm_scale
    st_mask = (offs_n[:, None] < Skv) & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=st_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=st_mask)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
    start, end, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_MODE: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr,
    SOFTCAP: tl.constexpr, SEG_FULL: tl.constexpr,
):
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], offs_n, Skv, offs_d,
                       MASK_MODE != 0, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], offs_n, Skv, offs_d,
                       MASK_MODE != 0, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            s, r = _tanh(s * tanh_scale)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if (HAS_SEG and not SEG_FULL) or MASK_MODE == 1:
            kv_seg = q_seg
            if HAS_SEG:
                kv_seg = tl.load(kvseg_base + offs_n, mask=offs_n < Skv, other=-1)
            vis = _visible(offs_m[:, None], offs_n[None, :], q_seg[:, None], kv_seg[None, :], Sq, Skv, window,
                           MASK_MODE != 0, CAUSAL, WINDOW, HAS_SEG)
            p = tl.where(vis, p, 0.0)
        elif MASK_MODE == 2:
            if (n0 < ulo) | (n0 >= uhi):
                vis = _visible_outside(offs_m, offs_n, q_seg, kvseg_base, Sq, Skv, window, CAUSAL, WINDOW, HAS_SEG)
                p = tl.where(vis, p, 0.0)
        if SOFTCAP:
            p = p * (r * (2.0 - r))
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@fast_launch
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, QSEG, KVSEG, SEG_LO, SEG_HI, SEG_FLO, SEG_FHI,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqh, stride_dqm,
    stride_qsb, stride_ksb,
    Hq, G, Sq, Skv, window, qk_scale, tanh_scale, sm_scale, n_m_blocks,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_SEG: tl.constexpr, SPLIT: tl.constexpr,
    SOFTCAP: tl.constexpr, SEG_FULL: tl.constexpr,
):
    bh = tl.program_id(0)
    m_blk = n_m_blocks - 1 - tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    b64 = b.to(tl.int64)
    m0 = m_blk * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :],
                   offs_m, Sq, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_rows(
        DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :],
        offs_m, Sq, offs_d, True, HEAD_DIM, BLOCK_D,
    )
    lse = tl.load(LSE + bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + offs_m, mask=offs_m < Sq, other=0.0)
    q_seg = offs_m
    if HAS_SEG:
        q_seg = tl.load(QSEG + b64 * stride_qsb + offs_m, mask=offs_m < Sq, other=-1)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    kvseg_base = KVSEG + b64 * stride_ksb
    lo, ulo, uhi, hi = _kv_range_of_q_block(
        m0, Sq, Skv, window, SEG_LO + b * n_m_blocks + m_blk, SEG_HI + b * n_m_blocks + m_blk,
        SEG_FLO + b * n_m_blocks + m_blk, SEG_FHI + b * n_m_blocks + m_blk,
        BLOCK_M, BLOCK_N, CAUSAL, WINDOW, HAS_SEG, SEG_FULL,
    )
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPLIT:
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            lo, tl.minimum(ulo, hi), ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 1, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            ulo, uhi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 0, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            uhi, hi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 1, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
    else:
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, q_seg, offs_m, offs_d, k_base, v_base, kvseg_base, stride_kn, stride_vn,
            lo, hi, ulo, uhi, Sq, Skv, window, qk_scale, tanh_scale,
            BLOCK_N, HEAD_DIM, BLOCK_D, 2, CAUSAL, WINDOW, HAS_SEG, SOFTCAP, SEG_FULL,
        )
    dq = dq * sm_scale
    tl.store(
        DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :],
        dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM),
    )


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


def _unit_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


# Experimental (LITESPARK_ATTN_SEGMENT_FULL=1, off by default until a GPU run has timed it): with segment ids, blocks
# whose query rows all belong to one document that covers the whole key block skip the elementwise segment mask
# (today every visited block is masked). Read at import; tests set the attribute.
SEGMENT_FULL_BLOCKS = os.environ.get("LITESPARK_ATTN_SEGMENT_FULL", "0") == "1"


def _flags(causal: bool, sliding_window: int | None, segs, softcap: float | None) -> dict:
    return dict(CAUSAL=bool(causal), WINDOW=sliding_window is not None, HAS_SEG=segs is not None,
                SOFTCAP=softcap is not None, SEG_FULL=segs is not None and SEGMENT_FULL_BLOCKS)


def _score_scales(scale: float, softcap: float | None) -> tuple[float, float]:
    """(qk_scale, tanh_scale) for the kernels. Without a soft-cap the exp2 argument is <q, k> * scale * log2(e)
    (tanh_scale unused); with one it is t * cap * log2(e), t = tanh(scale * <q, k> / cap) computed by ``_tanh`` from
    <q, k> * tanh_scale, tanh_scale = 2 * log2(e) * scale / cap."""
    if softcap is None:
        return scale * _LOG2E, 0.0
    return softcap * _LOG2E, 2.0 * _LOG2E * scale / softcap


def attention_forward(q, k, v, scale, causal, segs, sliding_window, softcap=None):
    """Launch the forward kernel; returns out [B, Sq, Hq, D] and the base-2 log-sum-exp [B, Hq, Sq] (fp32)."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    BM, BN, warps, stages, split = _config("fwd", block_d, max(Sq, Skv), q.device)
    n_m = triton.cdiv(Sq, BM)
    out = torch.empty(B, Sq, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Sq, dtype=torch.float32, device=q.device)
    flags = _flags(causal, sliding_window, segs, softcap)
    if segs is not None:
        qseg, kvseg = segs
        seg_lo, seg_hi, seg_flo, seg_fhi = _segment_ranges(qseg, kvseg, BM, flags["SEG_FULL"])
    else:
        qseg = kvseg = seg_lo = seg_hi = seg_flo = seg_fhi = lse  # placeholders, never read
    window = 0 if sliding_window is None else int(sliding_window)
    _attn_fwd_kernel[(B * Hq, n_m)](
        q, k, v, out, lse, qseg, kvseg, seg_lo, seg_hi, seg_flo, seg_fhi,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        qseg.stride(0), kvseg.stride(0),
        Hq, Hq // Hkv, Sq, Skv, window, *_score_scales(scale, softcap), n_m,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=BM, BLOCK_N=BN, SPLIT=split, **flags,
        num_warps=warps, num_stages=stages,
    )
    return out, lse


def attention_backward(do, q, k, v, out, lse, scale, causal, segs, sliding_window, softcap=None):
    """Launch the three backward kernels; returns dq, dk, dv with the strides of q, k, v."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    do = _unit_last_dim(do)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    delta = torch.empty_like(lse)
    window = 0 if sliding_window is None else int(sliding_window)
    flags = _flags(causal, sliding_window, segs, softcap)
    qk_scale, tanh_scale = _score_scales(scale, softcap)

    pre_m = 16 if interpreting() else 64
    _bwd_delta_kernel[(B * Hq, triton.cdiv(Sq, pre_m))](
        out, do, delta, out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hq, Sq, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_m, num_warps=4,
    )

    BM, BN, warps, stages, split = _config("dkv", block_d, max(Sq, Skv), q.device)
    n_n = triton.cdiv(Skv, BN)
    if segs is not None:
        qseg, kvseg = segs
        seg_lo, seg_hi, seg_flo, seg_fhi = _segment_ranges(kvseg, qseg, BN, flags["SEG_FULL"])
    else:
        qseg = kvseg = seg_lo = seg_hi = seg_flo = seg_fhi = lse
    _attn_bwd_dkv_kernel[(B * Hkv, n_n)](
        q, k, v, do, lse, delta, dk, dv, qseg, kvseg, seg_lo, seg_hi, seg_flo, seg_fhi,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        qseg.stride(0), kvseg.stride(0),
        Hq, Hkv, G, Sq, Skv, window, qk_scale, tanh_scale, scale, n_n,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=BM, BLOCK_N=BN, SPLIT=split, **flags,
        num_warps=warps, num_stages=stages,
    )

    BM, BN, warps, stages, split = _config("dq", block_d, max(Sq, Skv), q.device)
    n_m = triton.cdiv(Sq, BM)
    if segs is not None:
        seg_lo, seg_hi, seg_flo, seg_fhi = _segment_ranges(qseg, kvseg, BM, flags["SEG_FULL"])
    _attn_bwd_dq_kernel[(B * Hq, n_m)](
        q, k, v, do, lse, delta, dq, qseg, kvseg, seg_lo, seg_hi, seg_flo, seg_fhi,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        qseg.stride(0), kvseg.stride(0),
        Hq, G, Sq, Skv, window, qk_scale, tanh_scale, scale, n_m,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=BM, BLOCK_N=BN, SPLIT=split, **flags,
        num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


class TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, causal, q_segment_ids, kv_segment_ids, sliding_window, softcap):
        q, k, v = _unit_last_dim(q), _unit_last_dim(k), _unit_last_dim(v)
        segs = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
        out, lse = attention_forward(q, k, v, scale, causal, segs, sliding_window, softcap)
        ctx.save_for_backward(q, k, v, out, lse, q_segment_ids, kv_segment_ids)
        ctx.scale, ctx.causal, ctx.sliding_window, ctx.softcap = scale, causal, sliding_window, softcap
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, q_segment_ids, kv_segment_ids = ctx.saved_tensors
        segs = None if q_segment_ids is None else (q_segment_ids, kv_segment_ids)
        dq, dk, dv = attention_backward(do, q, k, v, out, lse, ctx.scale, ctx.causal, segs, ctx.sliding_window,
                                        ctx.softcap)
        return dq, dk, dv, None, None, None, None, None, None


def _prepare_segment_ids(ids: torch.Tensor, batch: int, length: int, name: str) -> torch.Tensor:
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[-1] != length or ids.shape[0] not in (1, batch):
        raise ValueError(f"{name} must be [B, {length}] (or [1, {length}]); got {tuple(ids.shape)}")
    ids = ids.to(torch.int32).contiguous()
    return ids.expand(batch, length)  # stride 0 over the batch when shared


def kernel_arguments(q, k, v, scale, q_segment_ids, kv_segment_ids, sliding_window):
    """The kernel's arguments from `attention_triton`'s (shapes checked; also used by the torch.compile custom op):
    (scale as a float, segment ids as int32 [B, S] or None, the window as an int or None)."""
    from .attention import _check_shapes

    _check_shapes(q, k, v)
    B, _, Sq, D = q.shape
    Skv = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if q_segment_ids is not None:
        q_segment_ids = _prepare_segment_ids(q_segment_ids, B, Sq, "q_segment_ids")
        kv_segment_ids = _prepare_segment_ids(kv_segment_ids, B, Skv, "kv_segment_ids")
    if sliding_window is not None:
        sliding_window = int(sliding_window)
    return scale, q_segment_ids, kv_segment_ids, sliding_window


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Triton attention with the semantics of ``attention.attention_reference``; returns [B, Sq, Hq, D].

    Attention dropout (``dropout_p > 0``) is not in the kernel: such calls run ``attention_sdpa`` (documented
    fallback; ``attention_reference`` with a ``softcap``). q, k and v may be strided views (e.g. the transposes
    transformers hands over); only a last dimension with stride != 1 is copied.
    """
    from .attention import _check_softcap, attention_reference, attention_sdpa

    _check_softcap(softcap)
    if dropout_p > 0.0:
        fallback = attention_sdpa if softcap is None else functools.partial(attention_reference, softcap=softcap)
        return fallback(
            q, k, v, scale=scale, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
            sliding_window=sliding_window, dropout_p=dropout_p,
        )
    scale, q_segment_ids, kv_segment_ids, sliding_window = kernel_arguments(
        q, k, v, scale, q_segment_ids, kv_segment_ids, sliding_window)
    softcap = None if softcap is None else float(softcap)
    return TritonAttention.apply(q, k, v, scale, causal, q_segment_ids, kv_segment_ids, sliding_window, softcap)
