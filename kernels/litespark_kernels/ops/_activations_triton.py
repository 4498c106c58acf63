"""Triton MLP activations, forward and backward; the backward recomputes the activation from the saved inputs.

- swiglu(gate, up)        = silu(gate) * up,           silu(g)  = g * sigmoid(g)
- geglu(gate, up)         = gelu_tanh(gate) * up
- gelu_tanh_bias(x, bias) = gelu_tanh(x + bias)

gelu_tanh(x) = 0.5 x (1 + tanh(k (x + c x^3))) = x * sigmoid(2 k (x + c x^3)),  k = sqrt(2/pi), c = 0.044715
(the sigmoid form is exact algebra and avoids tanh); its derivative is
sigma + 2 x sigma (1 - sigma) k (1 + 3 c x^2) with sigma = sigmoid(2 k (x + c x^3)).

Rounding follows the PyTorch expressions: the activation is rounded to the input dtype before the product
(``F.silu(gate) * up`` rounds twice), ``x + bias`` is rounded before the GELU. Gradients are computed in fp32 and
rounded once. Inputs are [..., N] with a contiguous last dimension (rows may be strided, so ``gate`` and ``up`` can
be the two halves of one fused projection); outputs are contiguous. dbias is reduced by a persistent grid: each
program sums its chunk of rows for one block of columns, and the [row groups, N] partial sums are added at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import fast_launch

from .._dispatch import as_rows as _as_rows
from .._dispatch import sm_count as _sm_count

SILU = 0
GELU_TANH = 1


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
    """(act(g), act'(g)) in fp32; act' is 0 when not NEED_GRAD."""
    if ACT == 0:
        sig = tl.sigmoid(g)
        a = g * sig
        if NEED_GRAD:
            da = sig * (1.0 + g * (1.0 - sig))
        else:
            da = a * 0.0
    else:
        k2 = 2.0 * 0.7978845608028654
        sig = tl.sigmoid(k2 * (g + 0.044715 * g * g * g))
        a = g * sig
        if NEED_GRAD:
            da = sig + g * sig * (1.0 - sig) * k2 * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            da = a * 0.0
    return a, da


@fast_launch
@triton.jit
def _glu_fwd_kernel(
    G, U, Y,
    stride_g, stride_u, stride_y,
    n_rows, n_cols,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT, False)
    a = a.to(G.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows64 * stride_y + cols[None, :], (a * u).to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _glu_bwd_kernel(
    DY, G, U, DG, DU,
    stride_dy, stride_g, stride_u, stride_dg, stride_du,
    n_rows, n_cols,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT, True)
    a = a.to(G.dtype.element_ty).to(tl.float32)
    tl.store(DG + rows64 * stride_dg + cols[None, :], (dy * u * da).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + rows64 * stride_du + cols[None, :], (dy * a).to(DU.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _gelu_bias_fwd_kernel(
    X, B, Y,
    stride_x, stride_y,
    n_rows, n_cols,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
        h = (h + b[None, :]).to(Y.dtype.element_ty).to(tl.float32)
    a, _ = _act_and_grad(h, 1, False)
    tl.store(Y + rows64 * stride_y + cols[None, :], a.to(Y.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit
def _gelu_bias_bwd_kernel(
    DY, X, B, DX, DB_PART,
    stride_dy, stride_x, stride_dx,
    n_rows, n_cols, rows_per_program,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One block of columns over a chunk of rows (next row tile loaded before the current one is computed);
    dbias partial sums go to DB_PART[row group]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pid_m = tl.program_id(1)
    col_mask = cols < n_cols
    offs_m = tl.arange(0, BLOCK_M)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid_m * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    rows = row_start + offs_m
    mask = (rows < row_end)[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + offs_m
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        n_rows_ = rows + BLOCK_M
        n_mask = (n_rows_ < row_end)[:, None] & col_mask[None, :]
        n_rows64 = n_rows_.to(tl.int64)[:, None]
        dy_next = tl.load(DY + n_rows64 * stride_dy + cols[None, :], mask=n_mask, other=0.0)
        x_next = tl.load(X + n_rows64 * stride_x + cols[None, :], mask=n_mask, other=0.0)
        h = x.to(tl.float32)
        if HAS_BIAS:
            h = (h + b[None, :]).to(DY.dtype.element_ty).to(tl.float32)
        _, da = _act_and_grad(h, 1, True)
        dh = dy.to(tl.float32) * da
        if HAS_BIAS:
            db_acc += tl.where(mask, dh, 0.0)
        tl.store(DX + rows64 * stride_dx + cols[None, :], dh.to(DX.dtype.element_ty), mask=mask)
        dy, x = dy_next, x_next
    if HAS_BIAS:
        tl.store(DB_PART + pid_m * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _tile(n_cols: int, tile: int | None, block_n: int | None, num_warps: int | None) -> tuple[int, int, int]:
    tile = tile or 4096
    bn = block_n or min(triton.next_power_of_2(n_cols), 1024)
    bm = max(1, tile // bn)
    nw = num_warps or (4 if bm * bn <= 2048 else 8)
    return bm, bn, nw


def glu_forward(gate, up, act: int, *, tile=None, block_n=None, num_warps=None) -> torch.Tensor:
    """act(gate) * up on 2D row views; output dtype promote(gate, up), contiguous."""
    n_rows, n_cols = gate.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if y.numel() == 0:
        return y
    bm, bn, nw = _tile(n_cols, tile, block_n, num_warps)
    grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))
    _glu_fwd_kernel[grid](
        gate, up, y, gate.stride(0), up.stride(0), y.stride(0), n_rows, n_cols,
        ACT=act, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
    )
    return y


def glu_backward(dy, gate, up, act: int, *, tile=None, block_n=None, num_warps=None, out=None):
    """(dgate, dup) on 2D row views, recomputing act(gate); ``out``: (dgate, dup) row views to write into."""
    n_rows, n_cols = gate.shape
    if out is not None:
        dg, du = out
    else:
        dg = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
        du = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    if dg.numel() == 0:
        return dg, du
    bm, bn, nw = _tile(n_cols, tile, block_n, num_warps)
    grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))
    _glu_bwd_kernel[grid](
        dy, gate, up, dg, du,
        dy.stride(0), gate.stride(0), up.stride(0), dg.stride(0), du.stride(0),
        n_rows, n_cols,
        ACT=act, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
    )
    return dg, du


def gelu_bias_forward(x, bias, *, tile=None, block_n=None, num_warps=None) -> torch.Tensor:
    n_rows, n_cols = x.shape
    out_dtype = x.dtype if bias is None else torch.promote_types(x.dtype, bias.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    if y.numel() == 0:
        return y
    bm, bn, nw = _tile(n_cols, tile, block_n, num_warps)
    grid = (triton.cdiv(n_rows, bm), triton.cdiv(n_cols, bn))
    _gelu_bias_fwd_kernel[grid](
        x, x if bias is None else bias, y, x.stride(0), y.stride(0), n_rows, n_cols,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
    )
    return y


def gelu_bias_backward(dy, x, bias, *, tile=None, block_n=None, num_warps=None, programs_per_sm=None):
    """(dx in x.dtype, dbias fp32 sums or None). ``dy`` has the forward output's dtype promote(x, bias)."""
    n_rows, n_cols = x.shape
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    has_bias = bias is not None
    if dx.numel() == 0:
        return dx, (torch.zeros((n_cols,), dtype=torch.float32, device=x.device) if has_bias else None)
    bm, bn, nw = _tile(n_cols, tile, block_n, num_warps)
    col_blocks = triton.cdiv(n_cols, bn)
    row_blocks = triton.cdiv(n_rows, bm)
    if has_bias:
        per_sm = programs_per_sm or max(1, 64 // nw)
        row_groups = max(1, min(row_blocks, (_sm_count(x.device) * per_sm) // col_blocks))
    else:
        row_groups = row_blocks
    rows_per_program = triton.cdiv(row_blocks, row_groups) * bm
    row_groups = triton.cdiv(n_rows, rows_per_program)
    db_part = torch.empty((row_groups, n_cols), dtype=torch.float32, device=x.device) if has_bias else dx
    _gelu_bias_bwd_kernel[(col_blocks, row_groups)](
        dy, x, x if bias is None else bias, dx, db_part,
        dy.stride(0), x.stride(0), dx.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw,
    )
    return dx, (db_part.sum(0) if has_bias else None)


# ---------------------------------------------------------------------------------------------------------------
# Autograd functions and entry points
# ---------------------------------------------------------------------------------------------------------------


class _GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
        g2, u2 = _as_rows(gate), _as_rows(up)
        y = glu_forward(g2, u2, act)
        ctx.save_for_backward(g2, u2)
        ctx.act = act
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        dg, du = glu_backward(_as_rows(dy), g2, u2, ctx.act)
        return dg.view(ctx.shape), du.view(ctx.shape), None


class _GLUPackedFunction(torch.autograd.Function):
    """act(gu[..., :I]) * gu[..., I:] for one fused gate+up projection; the backward writes one [.., 2I] gradient."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, act: int) -> torch.Tensor:
        if gu.shape[-1] % 2:
            raise ValueError(f"a packed gate+up needs an even last dimension, got {gu.shape[-1]}")
        half = gu.shape[-1] // 2
        gu2 = _as_rows(gu)
        y = glu_forward(gu2[:, :half], gu2[:, half:], act)
        ctx.save_for_backward(gu2)
        ctx.act = act
        ctx.shape = gu.shape
        return y.view(*gu.shape[:-1], half)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (gu2,) = ctx.saved_tensors
        half = gu2.shape[1] // 2
        d = torch.empty(gu2.shape, dtype=gu2.dtype, device=gu2.device)
        glu_backward(_as_rows(dy), gu2[:, :half], gu2[:, half:], ctx.act, out=(d[:, :half], d[:, half:]))
        return d.view(ctx.shape), None


class GeluTanhBiasFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if bias is not None:
            if tuple(bias.shape) != (x.shape[-1],):
                raise ValueError(f"bias of shape {tuple(bias.shape)} does not match last dimension {x.shape[-1]}")
            bias = bias.contiguous()
        x2 = _as_rows(x)
        y = gelu_bias_forward(x2, bias)
        ctx.save_for_backward(x2, bias)
        ctx.shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, bias = ctx.saved_tensors
        dx, db = gelu_bias_backward(_as_rows(dy), x2, bias)
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), db


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, Triton forward and backward."""
    return _GLUFunction.apply(gate, up, SILU)


def geglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, Triton forward and backward."""
    return _GLUFunction.apply(gate, up, GELU_TANH)


def swiglu_packed_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[..., :I]) * gate_up[..., I:], one [.., 2I] gradient."""
    return _GLUPackedFunction.apply(gate_up, SILU)


def geglu_packed_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate_up[..., :I]) * gate_up[..., I:], one [.., 2I] gradient."""
    return _GLUPackedFunction.apply(gate_up, GELU_TANH)


def gelu_tanh_bias_triton(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """gelu(x + bias, approximate="tanh") (bias optional, broadcast over the last dimension), Triton fwd and bwd."""
    return GeluTanhBiasFunction.apply(x, bias)
