"""Triton LayerNorm over the last dimension, forward and backward, matching ``F.layer_norm``.

Forward, in fp32 and rounded once to x.dtype:

    mean = mean(x);  rstd = rsqrt(mean((x - mean)^2) + eps);  xhat = (x - mean) * rstd
    y    = xhat * weight + bias

Backward, with g = dy * weight:

    dx      = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat;   dbias = sum over rows of dy

The structure follows ``_rms_norm_triton``: rows of up to ``MAX_FUSED_BLOCK`` padded columns live in registers
(a persistent backward accumulates dweight/dbias partial sums per program), wider rows are looped over column
chunks (one program per row) with dweight/dbias from a column-blocked kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import fast_launch

from .._dispatch import as_rows as _as_rows
from .._dispatch import sm_count as _sm_count

MAX_FUSED_BLOCK = 16384
LOOP_BLOCK = 4096


@fast_launch
@triton.jit
def _ln_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,
    stride_x, stride_y,
    n_rows, n_cols, eps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _ln_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Persistent over a chunk of rows, next tile loaded before the current one is computed."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    offs_m = tl.arange(0, BLOCK_M)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    rows = row_start + offs_m
    row_mask = rows < row_end
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + offs_m
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        n_rows_ = rows + BLOCK_M
        n_row_mask = n_rows_ < row_end
        n_mask = n_row_mask[:, None] & col_mask[None, :]
        n_rows64 = n_rows_.to(tl.int64)[:, None]
        x_next = tl.load(X + n_rows64 * stride_x + cols[None, :], mask=n_mask, other=0.0)
        dy_next = tl.load(DY + n_rows64 * stride_dy + cols[None, :], mask=n_mask, other=0.0)
        mean_next = tl.load(MEAN + n_rows_, mask=n_row_mask, other=0.0)
        rstd_next = tl.load(RSTD + n_rows_, mask=n_row_mask, other=0.0)
        dyf = dy.to(tl.float32)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        dw_acc += dyf * xhat
        if HAS_BIAS:
            db_acc += dyf
        g = dyf * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / n_cols
        c2 = tl.sum(g, axis=1) / n_cols
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        tl.store(DX + rows64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        x, dy, mean, rstd = x_next, dy_next, mean_next, rstd_next
    tl.store(DW_PART + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@fast_launch
@triton.jit
def _ln_fwd_looped_kernel(
    X, Y, W, B, MEAN, RSTD,
    stride_x, stride_y,
    n_cols, eps,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        acc += tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=0) / n_cols
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        xc = tl.where(mask, x - mean, 0.0)
        acc += xc * xc
    rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * w
        if HAS_BIAS:
            y += tl.load(B + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + row * stride_y + c0 + cols, y.to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _ln_bwd_dx_looped_kernel(
    DY, X, W, MEAN, RSTD, DX,
    stride_dy, stride_x, stride_dx,
    n_cols,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    acc1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        g = dy * w
        acc1 += g * tl.where(mask, (x - mean) * rstd, 0.0)
        acc2 += g
    c1 = tl.sum(acc1, axis=0) / n_cols
    c2 = tl.sum(acc2, axis=0) / n_cols
    for c0 in range(0, n_cols, BLOCK_N):
        mask = c0 + cols < n_cols
        x = tl.load(X + row * stride_x + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + c0 + cols, mask=mask, other=0.0).to(tl.float32)
        dx = (dy * w - c2 - (x - mean) * rstd * c1) * rstd
        tl.store(DX + row * stride_dx + c0 + cols, dx.to(DX.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _ln_bwd_dwdb_looped_kernel(
    DY, X, MEAN, RSTD, DW_PART, DB_PART,
    stride_dy, stride_x,
    n_rows, n_cols, rows_per_program,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_m = tl.program_id(1)
    col_mask = cols < n_cols
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        dw_acc += dy * ((x - mean[:, None]) * rstd[:, None])
        if HAS_BIAS:
            db_acc += dy
    tl.store(DW_PART + pid_m * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid_m * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


def _fwd_config(n_cols: int, block_m: int | None, num_warps: int | None) -> tuple[int, int, int]:
    block_n = triton.next_power_of_2(n_cols)
    if block_m is None:
        block_m = max(1, min(16, 2048 // block_n))
    tile = block_m * block_n
    if num_warps is None:
        num_warps = 4 if tile <= 4096 else 8 if tile <= 8192 else 16
    return block_m, block_n, num_warps


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


def layer_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward on a 2D row view. Returns (y in x.dtype, mean[M] fp32, rstd[M] fp32)."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    mean = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((n_rows,), dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, mean, rstd
    has_bias = bias is not None
    b_arg = bias if has_bias else weight
    if triton.next_power_of_2(n_cols) <= MAX_FUSED_BLOCK:
        bm, bn, nw = _fwd_config(n_cols, block_m, num_warps)
        _ln_fwd_kernel[(triton.cdiv(n_rows, bm),)](
            x, y, weight, b_arg, mean, rstd,
            x.stride(0), y.stride(0),
            n_rows, n_cols, eps,
            HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
    else:
        bn = min(LOOP_BLOCK, triton.next_power_of_2(n_cols))
        _ln_fwd_looped_kernel[(n_rows,)](
            x, y, weight, b_arg, mean, rstd,
            x.stride(0), y.stride(0),
            n_cols, eps,
            HAS_BIAS=has_bias, BLOCK_N=bn, num_warps=8,
        )
    return y, mean, rstd


def layer_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    has_bias: bool,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    *,
    block_m: int | None = None,
    num_warps: int | None = None,
    programs_per_sm: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Backward on 2D row views. Returns (dx, dweight fp32 sums, dbias fp32 sums or None)."""
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        zeros = torch.zeros((n_cols,), dtype=torch.float32, device=x.device)
        return dx, zeros, (zeros.clone() if has_bias else None)
    sms = _sm_count(x.device)
    if triton.next_power_of_2(n_cols) <= MAX_FUSED_BLOCK:
        bm, bn, nw, per_sm = _bwd_config(n_cols, block_m, num_warps, programs_per_sm)
        grid = min(triton.cdiv(n_rows, bm), sms * per_sm)
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, grid), bm) * bm
        grid = triton.cdiv(n_rows, rows_per_program)
        dw_part = torch.empty((grid, n_cols), dtype=torch.float32, device=x.device)
        db_part = torch.empty((grid, n_cols), dtype=torch.float32, device=x.device) if has_bias else dw_part
        _ln_bwd_kernel[(grid,)](
            dy, x, weight, mean, rstd, dx, dw_part, db_part,
            dy.stride(0), x.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program,
            HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
        )
    else:
        bn = min(LOOP_BLOCK, triton.next_power_of_2(n_cols))
        _ln_bwd_dx_looped_kernel[(n_rows,)](
            dy, x, weight, mean, rstd, dx,
            dy.stride(0), x.stride(0), dx.stride(0),
            n_cols,
            BLOCK_N=bn, num_warps=8,
        )
        bm, bn = 8, min(512, triton.next_power_of_2(n_cols))
        col_blocks = triton.cdiv(n_cols, bn)
        row_groups = max(1, min(triton.cdiv(n_rows, bm), (sms * 8) // col_blocks))
        rows_per_program = triton.cdiv(triton.cdiv(n_rows, row_groups), bm) * bm
        row_groups = triton.cdiv(n_rows, rows_per_program)
        dw_part = torch.empty((row_groups, n_cols), dtype=torch.float32, device=x.device)
        db_part = torch.empty((row_groups, n_cols), dtype=torch.float32, device=x.device) if has_bias else dw_part
        _ln_bwd_dwdb_looped_kernel[(col_blocks, row_groups)](
            dy, x, mean, rstd, dw_part, db_part,
            dy.stride(0), x.stride(0),
            n_rows, n_cols, rows_per_program,
            HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
    return dx, dw_part.sum(0), (db_part.sum(0) if has_bias else None)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
        n = x.shape[-1]
        if weight.dim() != 1 or weight.shape[0] != n or (bias is not None and tuple(bias.shape) != (n,)):
            raise ValueError(f"weight/bias shapes do not match hidden size {n}")
        weight = weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        x2 = _as_rows(x)
        y, mean, rstd = layer_norm_forward(x2, weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, mean, rstd = ctx.saved_tensors
        has_bias = ctx.bias_dtype is not None
        dx, dw, db = layer_norm_backward(_as_rows(dy), x2, weight, has_bias, mean, rstd)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = db.to(ctx.bias_dtype) if has_bias and ctx.needs_input_grad[2] else None
        return dx.view(ctx.x_shape), dw, db, None


def layer_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension (``F.layer_norm`` semantics), Triton forward and backward."""
    return LayerNormFunction.apply(x, weight, bias, float(eps))
