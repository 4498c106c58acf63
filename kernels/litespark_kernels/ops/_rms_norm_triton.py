"""Triton RMSNorm and fused residual-add + RMSNorm, forward and backward.

Semantics are transformers' LlamaRMSNorm, rounding order included:

    h    = x.float();  rstd = rsqrt(mean(h^2) + eps)
    y    = weight * (h * rstd).to(x.dtype)          # one fp32 product, rounded once to promote(weight, x)

``add_rms_norm`` first forms s = (x + residual) rounded to promote(x, residual), exactly like ``x + residual``,
and normalises s; it returns (y, s).

With ``offset`` (Gemma's RMSNorm, ``HAS_OFFSET``): y = (h * rstd) * (offset + weight) all in fp32, rounded once to
x.dtype by default (``(norm(x.float()) * (1 + weight.float())).type_as(x)``); the backward then uses offset + weight
for g and the unrounded hn for dweight.

Backward, with hn = h * rstd and g = dy * weight (all in fp32; the cast to x.dtype is treated as the identity,
as autograd does):

    dx      = rstd * (g - hn * mean(g * hn))          (+ ds, the gradient of s, for the fused add)
    dweight = sum over rows of dy * hn.to(x.dtype)

Layout: rows of the last dimension (any leading shape is flattened; the last dimension must be contiguous, rows
may be strided). Rows of up to ``MAX_FUSED_BLOCK`` (16384) padded columns are held in registers (one read of x
per pass); wider rows take a looped path that reads x twice. The backward is persistent: a grid of about
``programs_per_sm`` programs per SM, each walking a contiguous chunk of rows and accumulating its share of
dweight in fp32 registers; the [programs, hidden] partial sums are added up by one ``sum(0)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._launch import fast_launch

from .._dispatch import as_rows as _as_rows
from .._dispatch import sm_count as _sm_count

# Widest row (in padded columns) that one program holds in registers; wider rows use the looped kernels.
MAX_FUSED_BLOCK = 16384
# Column chunk of the looped kernels.
LOOP_BLOCK = 4096


# ---------------------------------------------------------------------------------------------------------------
# Kernels: rows held in registers
# ---------------------------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _rms_fwd_kernel(
    X, R, S, Y, W, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_rows, n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows64 * stride_s + cols[None, :], s, mask=mask)
        h = s.to(tl.float32)
        in_dtype = S.dtype.element_ty
    else:
        h = x.to(tl.float32)
        in_dtype = X.dtype.element_ty
    rstd = tl.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:  # Gemma: the product in fp32, one rounding
        w = w + offset
        hn = h * rstd[:, None]
    else:
        hn = (h * rstd[:, None]).to(in_dtype).to(tl.float32)
    y = w[None, :] * hn
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _rms_bwd_kernel(
    DY, DS, X, W, RSTD, DX, DX2, DW_PART,
    stride_dy, stride_ds, stride_x, stride_dx, stride_dx2,
    n_rows, n_cols, rows_per_program, offset,
    HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Persistent: this program walks rows [pid * rows_per_program, ...) one BLOCK_M tile at a time, loading the
    next tile before computing the current one, and writes its dweight partial sum to DW_PART[pid]."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    offs_m = tl.arange(0, BLOCK_M)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        w = w + offset
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # first tile
    rows = row_start + offs_m
    row_mask = rows < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    if HAS_DS:
        ds = tl.load(DS + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0)
    else:
        ds = dy
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + offs_m
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        # prefetch the next tile (fully masked past the end: no memory traffic)
        n_rows_ = rows + BLOCK_M
        n_row_mask = n_rows_ < row_end
        n_mask = n_row_mask[:, None] & col_mask[None, :]
        n_rows64 = n_rows_.to(tl.int64)[:, None]
        x_next = tl.load(X + n_rows64 * stride_x + cols[None, :], mask=n_mask, other=0.0)
        dy_next = tl.load(DY + n_rows64 * stride_dy + cols[None, :], mask=n_mask, other=0.0)
        rstd_next = tl.load(RSTD + n_rows_, mask=n_row_mask, other=0.0)
        if HAS_DS:
            ds_next = tl.load(DS + n_rows64 * stride_ds + cols[None, :], mask=n_mask, other=0.0)
        else:
            ds_next = dy_next
        # current tile
        dyf = dy.to(tl.float32)
        hn = x.to(tl.float32) * rstd[:, None]
        if HAS_OFFSET:
            dw_acc += dyf * hn
        else:
            dw_acc += dyf * hn.to(X.dtype.element_ty).to(tl.float32)
        g = dyf * w[None, :]
        c = tl.sum(g * hn, axis=1) / n_cols
        dx = (g - hn * c[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += ds.to(tl.float32)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + rows64 * stride_dx2 + cols[None, :], dx.to(DX2.dtype.element_ty), mask=mask)
        x, dy, rstd, ds = x_next, dy_next, rstd_next, ds_next
    tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------
# Kernels: wide rows, looped over column chunks (one program per row; dweight by a column-blocked kernel)
# ---------------------------------------------------------------------------------------------------------------


@fast_launch
@triton.jit
def _rms_fwd_looped_kernel(
    X, R, S, Y, W, RSTD,
    stride_x, stride_r, stride_s, stride_y,
    n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(R + row * stride_r + c0 + cols, mask=mask, other=0.0)
            s = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + row * stride_s + c0 + cols, s, mask=mask)
            h = s.to(tl.float32)
        else:
            h = x.to(tl.float32)
        acc += h * h
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
    tl.store(RSTD + row, rstd)
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        if HAS_RESIDUAL:
            h = tl.load(S + row * stride_s + c0 + cols, mask=mask, other=0.0)
        else:
            h = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0)
        in_dtype = h.dtype
        w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = w + offset
            hn = h.to(tl.float32) * rstd
        else:
            hn = (h.to(tl.float32) * rstd).to(in_dtype).to(tl.float32)
        tl.store(Y + row * stride_y + c0 + cols, (w * hn).to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _rms_bwd_dx_looped_kernel(
    DY, DS, X, W, RSTD, DX, DX2,
    stride_dy, stride_ds, stride_x, stride_dx, stride_dx2,
    n_cols, offset,
    HAS_DS: tl.constexpr, HAS_DX2: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    rstd = tl.load(RSTD + row)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = w + offset
        acc += dy * w * x * rstd
    c = tl.sum(acc, axis=0) / n_cols
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            w = w + offset
        dx = (dy * w - x * rstd * c) * rstd
        if HAS_DS:
            dx += tl.load(DS + row * stride_ds + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride_dx + c0 + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DX2:
            tl.store(DX2 + row * stride_dx2 + c0 + cols, dx.to(DX2.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _rms_bwd_dw_looped_kernel(
    DY, X, RSTD, DW_PART,
    stride_dy, stride_x,
    n_rows, n_cols, rows_per_program,
    HAS_OFFSET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_m = tl.program_id(1)
    col_mask = cols < n_cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        if HAS_OFFSET:
            acc += dy * (x.to(tl.float32) * rstd[:, None])
        else:
            acc += dy * (x.to(tl.float32) * rstd[:, None]).to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW_PART + pid_m * n_cols + cols, tl.sum(acc, axis=0), mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _fwd_config(n_cols: int, block_m: int | None, num_warps: int | None) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n_cols)
    if block_m is None:
        block_m = max(1, min(16, 2048 // block_n))
    tile = block_m * block_n
    if num_warps is None:
        num_warps = 4 if tile <= 4096 else 8 if tile <= 8192 else 16
    return block_m, block_n, num_warps


@functools.lru_cache(maxsize=256)
def _bwd_config(
    n_cols: int, block_m: int | None, num_warps: int | None, programs_per_sm: int | None
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs per SM) of the persistent backward."""
    block_n = triton.next_power_of_2(n_cols)
    if block_m is None:
        block_m = max(1, min(16, 1024 // block_n))
    tile = block_m * block_n
    # (num_warps, programs per SM) by tile size. 2048 and 4096 were the best configurations timed on an H100
    # (benchmarks/NOTES.md, "Norms, RoPE, activations"); the others follow the same ~16 elements per thread.
    nw, per_sm = (4, 16) if tile <= 1024 else (8, 4) if tile <= 2048 else (8, 2) if tile <= 4096 else \
        (16, 2) if tile <= 8192 else (32, 1)
    return block_m, block_n, num_warps or nw, programs_per_sm or per_sm


def rms_norm_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
    out_dtype: torch.dtype | None = None,
    offset: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward on 2D row views. Returns (y, s or None, rstd[M] fp32).

    ``out_dtype``: store y in this dtype (the fp32 result rounded once) instead of promote(weight, x) (with
    ``offset``: instead of the input's dtype). ``offset``: Gemma's norm (see the module docstring)."""
    n_rows, n_cols = x.shape
    in_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    if out_dtype is None and offset is not None:
        out_dtype = in_dtype
    if out_dtype is None:
        out_dtype = in_dtype if weight.dtype == in_dtype else torch.promote_types(weight.dtype, in_dtype)
    has_off, off = offset is not None, float(offset or 0.0)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    s = None if residual is None else torch.empty((n_rows, n_cols), dtype=in_dtype, device=x.device)
    if n_rows == 0:
        return y, s, rstd
    has_res = residual is not None
    r_arg, s_arg = (residual, s) if has_res else (x, y)
    stride_r, stride_s = (residual.stride(0), s.stride(0)) if has_res else (0, 0)
    if triton.next_power_of_2(n_cols) <= MAX_FUSED_BLOCK:
        bm, bn, nw = _fwd_config(n_cols, block_m, num_warps)
        _rms_fwd_kernel[(triton.cdiv(n_rows, bm),)](
            x, r_arg, s_arg, y, weight, rstd,
            x.stride(0), stride_r, stride_s, y.stride(0),
            n_rows, n_cols, eps, off,
            HAS_RESIDUAL=has_res, HAS_OFFSET=has_off, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
    else:
        bn = min(LOOP_BLOCK, triton.next_power_of_2(n_cols))
        _rms_fwd_looped_kernel[(n_rows,)](
            x, r_arg, s_arg, y, weight, rstd,
            x.stride(0), stride_r, stride_s, y.stride(0),
            n_cols, eps, off,
            HAS_RESIDUAL=has_res, HAS_OFFSET=has_off, BLOCK_N=bn, num_warps=8,
        )
    return y, s, rstd


def rms_norm_backward(
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    *,
    dx_dtype: torch.dtype | None = None,
    dx2_dtype: torch.dtype | None = None,
    block_m: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
    offset: float | None = None,
):
    """Launch the backward on 2D row views (x is the normalised input: s for the fused add).

    Returns (dx [M, N] in ``dx_dtype`` (default x.dtype), dweight in weight.dtype); ``ds`` is added to dx.
    With ``dx2_dtype``, also a second copy of dx rounded once from fp32 to that dtype (the fused add's gradient for
    a low-precision x next to a fp32 residual): (dx, dweight, dx2). ``offset``: as in `rms_norm_forward`.
    """
    n_rows, n_cols = x.shape
    has_off, off = offset is not None, float(offset or 0.0)
    dx = torch.empty((n_rows, n_cols), dtype=dx_dtype or x.dtype, device=x.device)
    dx2 = torch.empty((n_rows, n_cols), dtype=dx2_dtype, device=x.device) if dx2_dtype is not None else None
    if n_rows == 0:
        return (dx, torch.zeros_like(weight)) + ((dx2,) if dx2 is not None else ())
    has_ds = ds is not None
    has_dx2 = dx2 is not None
    dx2_arg, stride_dx2 = (dx2, dx2.stride(0)) if has_dx2 else (dx, 0)
    ds_arg, stride_ds = (ds, ds.stride(0)) if has_ds else (dy, 0)
    sms = _sm_count(x.device)
    if triton.next_power_of_2(n_cols) <= MAX_FUSED_BLOCK:
        bm, bn, nw, per_sm = _bwd_config(n_cols, block_m, num_warps, programs_per_sm)
        grid = min(triton.cdiv(n_rows, bm), sms * per_sm)
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, grid), bm) * bm
        grid = triton.cdiv(n_rows, rows_per_program)
        dw_part = torch.empty((grid, n_cols), dtype=torch.float32, device=x.device)
        _rms_bwd_kernel[(grid,)](
            dy, ds_arg, x, weight, rstd, dx, dx2_arg, dw_part,
            dy.stride(0), stride_ds, x.stride(0), dx.stride(0), stride_dx2,
            n_rows, n_cols, rows_per_program, off,
            HAS_DS=has_ds, HAS_DX2=has_dx2, HAS_OFFSET=has_off, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
    else:
        bn = min(LOOP_BLOCK, triton.next_power_of_2(n_cols))
        _rms_bwd_dx_looped_kernel[(n_rows,)](
            dy, ds_arg, x, weight, rstd, dx, dx2_arg,
            dy.stride(0), stride_ds, x.stride(0), dx.stride(0), stride_dx2,
            n_cols, off,
            HAS_DS=has_ds, HAS_DX2=has_dx2, HAS_OFFSET=has_off, BLOCK_N=bn, num_warps=8,
        )
        bm, bn = 8, min(512, triton.next_power_of_2(n_cols))
        col_blocks = triton.cdiv(n_cols, bn)
        row_groups = max(1, min(triton.cdiv(n_rows, bm), (sms * 8) // col_blocks))
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, row_groups), bm) * bm
        row_groups = triton.cdiv(n_rows, rows_per_program)
        dw_part = torch.empty((row_groups, n_cols), dtype=torch.float32, device=x.device)
        _rms_bwd_dw_looped_kernel[(col_blocks, row_groups)](
            dy, x, rstd, dw_part,
            dy.stride(0), x.stride(0),
            n_rows, n_cols, rows_per_program,
            HAS_OFFSET=has_off, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
    dw = dw_part.sum(0).to(weight.dtype)
    return (dx, dw) if dx2 is None else (dx, dw, dx2)


# ---------------------------------------------------------------------------------------------------------------
# Autograd functions and entry points
# ---------------------------------------------------------------------------------------------------------------


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype=None, offset=None) -> torch.Tensor:
        _check(x, weight)
        weight = weight.contiguous()
        x2 = _as_rows(x)
        y, _, rstd = rms_norm_forward(x2, None, weight, eps, out_dtype=out_dtype, offset=offset)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.x_shape = x.shape
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(_as_rows(dy), None, x2, weight, rstd, offset=ctx.offset)
        return dx.view(ctx.x_shape), (dw if ctx.needs_input_grad[1] else None), None, None, None


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype=None,
                offset=None):
        _check(x, weight)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
        weight = weight.contiguous()
        y, s, rstd = rms_norm_forward(_as_rows(x), _as_rows(residual), weight, eps, out_dtype=out_dtype,
                                      offset=offset)
        ctx.save_for_backward(s, weight, rstd)
        ctx.shape = x.shape
        ctx.dtypes = (x.dtype, residual.dtype)
        ctx.offset = offset
        return y.view(x.shape), s.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor | None, ds: torch.Tensor | None):
        s, weight, rstd = ctx.saved_tensors
        x_dtype, r_dtype = ctx.dtypes
        dw = None
        if dy is None:  # only s was used downstream
            dsum = ds if ds is not None else torch.zeros(ctx.shape, dtype=s.dtype, device=s.device)
            dsum = dsum.reshape(ctx.shape)
            if ctx.needs_input_grad[2]:
                dw = torch.zeros_like(weight)
        else:
            # x in bf16/fp16 next to a residual in s's dtype (the attention/MLP output added to the fp32 stream):
            # the kernel writes x's gradient rounded once from fp32 as well, instead of a separate cast pass
            two = ctx.needs_input_grad[0] and ctx.needs_input_grad[1] and x_dtype != s.dtype and r_dtype == s.dtype
            out = rms_norm_backward(_as_rows(dy), None if ds is None else _as_rows(ds), s, weight, rstd,
                                    dx2_dtype=x_dtype if two else None, offset=ctx.offset)
            dw = out[1] if ctx.needs_input_grad[2] else None
            dsum = out[0].view(ctx.shape)
            if two:
                return out[2].view(ctx.shape), dsum, dw, None, None, None
        dx = dsum.to(x_dtype) if ctx.needs_input_grad[0] else None
        dr = dsum.to(r_dtype) if ctx.needs_input_grad[1] else None
        return dx, dr, dw, None, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                    out_dtype: torch.dtype | None = None, offset: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension (transformers' LlamaRMSNorm semantics; Gemma's with ``offset``), Triton
    forward and backward."""
    return RMSNormFunction.apply(x, weight, float(eps), out_dtype, None if offset is None else float(offset))


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
    out_dtype: torch.dtype | None = None, offset: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over the rows, Triton forward and backward."""
    return AddRMSNormFunction.apply(x, residual, weight, float(eps), out_dtype,
                                    None if offset is None else float(offset))
