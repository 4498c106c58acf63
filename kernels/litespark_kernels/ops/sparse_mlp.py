"""Structured channel skipping for MLPs (Sparsity-Accelerated Training, Ma et al. 2024, arXiv 2406.01392).

Only the selected intermediate channels ``index`` (a sorted 1-D int64 tensor of ``k`` channel ids) are computed:

- gated MLP (Llama, Mistral, Qwen2, Qwen3): ``down[:, idx](act(gate[idx] x) * up[idx] x)``
- plain MLP (StarCoder2): ``proj[:, idx](act(fc[idx] x + b_fc[idx])) + b_proj``

The weights are gathered (``index_select``: rows of gate/up/fc, columns of down/proj: a copy of ``k * hidden``
elements) and the products are ordinary dense GEMMs of size ``[tokens, hidden] x [hidden, k]`` and
``[tokens, k] x [k, hidden]``: forward and backward do ``k / intermediate`` of the dense MLP's matmul work, and no
full-size masked matmul runs. The gather's backward scatters the gradients of the gathered slices back,
so the full weights' gradients are exactly zero on the omitted rows/columns.

Two versions. `sparse_gated_mlp` / `sparse_mlp` compose autograd-aware pieces: `gather_weight` (``index_select``
then a cast of the gathered slice to the compute dtype; its backward writes the kept slices into a zero-filled
full-size gradient with ``index_copy_``: no atomics, no second fp32 copy), ``F.linear`` and the fused activations.
`sparse_gated_mlp_fused` (what SAT's gated MLP runs) is the same product in three autograd nodes: `gathered_linear`
(one gather, optionally from the forward's bf16 weight copies, and one GEMM, fp32 weight gradients from the GEMM) over
the packed ``[gate; up]`` rows, the packed activation, `gathered_linear` over the down columns; `gathered_linear` is
also the kept heads' q/k/v and o.
A Triton GEMM that reads the rows in place would only save the gather copy (``3 * k * hidden`` elements per layer,
small beside the GEMMs), so none is written.

``*_reference`` functions are the specification and test oracle: the dense MLP with the omitted channels' activations
zeroed (same result; gradients of omitted rows are then zero too, since nothing downstream depends on them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import geglu, geglu_packed, gelu_tanh_bias, swiglu, swiglu_packed
from .linear import _mm, bias_vector

_GATED = {"silu": swiglu, "gelu_tanh": geglu}


def _gated_act(activation: str):
    try:
        return _GATED[activation]
    except KeyError:
        raise ValueError(f"unknown gated activation {activation!r}; known: {sorted(_GATED)}") from None


def _act_reference(name: str, x: torch.Tensor) -> torch.Tensor:
    return F.silu(x) if name == "silu" else F.gelu(x, approximate="tanh")


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``weight`` runs in: the autocast dtype when autocast is on for its device (and the weight
    is floating point), else the weight's own."""
    dev = weight.device.type
    if weight.is_floating_point() and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class _GatherWeight(torch.autograd.Function):
    """``weight.index_select(dim, index).to(dtype)`` whose backward is a zero-filled full-size gradient with the kept
    slices copied in (``index`` sorted and unique, as SAT's selections are)."""

    @staticmethod
    def forward(ctx, weight, index, dim, dtype):
        ctx.dim, ctx.shape, ctx.wdtype = dim, weight.shape, weight.dtype
        ctx.save_for_backward(index)
        out = weight.index_select(dim, index)
        return out if out.dtype == dtype else out.to(dtype)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        full = grad.new_zeros(ctx.shape, dtype=ctx.wdtype)
        full.index_copy_(ctx.dim, index, grad.to(ctx.wdtype))
        return full, None, None, None


def gather_weight(weight: torch.Tensor, index: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Rows (``dim=0``) or columns (``dim=1``) ``index`` of ``weight``, in the matmul's compute dtype (see
    `compute_dtype`); the gradient of the omitted slices is exactly zero."""
    return _GatherWeight.apply(weight, index, dim, compute_dtype(weight))


class _GatheredLinear(torch.autograd.Function):
    """``cat([F.linear(x, w[rows_i], b[rows_i]) ...], -1)`` (``dim=0``: rows of each weight) or ``F.linear(x,
    w[:, rows], b)`` (``dim=1``: columns of one weight, its bias in full) as one GEMM over the gathered weights; the
    weights' gradients are full-size, in their own dtype, zero outside the gathered rows/columns."""

    @staticmethod
    def forward(ctx, x, dim, rows, rows_cat, cast, n_weights, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        cdt = compute_dtype(weights[0])
        full = (sum(w.shape[0] for w in weights), weights[0].shape[1])
        if cast is not None and cast.dtype == cdt and tuple(cast.shape) == full:
            w = cast.index_select(dim, rows_cat)
        elif dim == 1:
            w = weights[0].index_select(1, rows[0]).to(cdt)
        else:
            w = torch.empty(rows_cat.numel(), full[1], dtype=cdt, device=x.device)
            torch.cat([wi.index_select(0, r) for wi, r in zip(weights, rows)], out=w)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != cdt:
            x2 = x2.to(cdt)
        with torch.autocast(x.device.type, enabled=False):
            y = x2 @ w.t()
            if dim == 0:  # the kept entries of each bias
                biases = [None if bi is None else bi.index_select(0, r) for bi, r in zip(biases, rows)]
            b = bias_vector(biases, [r.numel() for r in rows], cdt, x.device)
            if b is not None:
                y = y + b
        ctx.save_for_backward(x2, w, *rows)
        ctx.meta = (dim, x.shape, x.dtype, [wi.shape for wi in weights], [wi.dtype for wi in weights],
                    [None if bi is None else bi.dtype for bi in biases])
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, w, *rows = ctx.saved_tensors
        dim, x_shape, x_dtype, shapes, wdts, bdts = ctx.meta
        n = len(shapes)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        dx = _mm(dy2, w, x_dtype).view(x_shape) if ctx.needs_input_grad[0] else None
        need_w, need_b = ctx.needs_input_grad[6:6 + n], ctx.needs_input_grad[6 + n:]
        dws, dbs = [None] * n, [None] * n
        if dim == 1:
            if need_w[0]:
                dws[0] = dy2.new_zeros(shapes[0], dtype=wdts[0]).index_copy_(
                    1, rows[0], _mm(dy2.t(), x2, wdts[0]))
            if need_b[0]:
                dbs[0] = dy2.sum(0, dtype=torch.float32).to(bdts[0])
            return (dx, None, None, None, None, None, *dws, *dbs)
        sizes = [r.numel() for r in rows]
        if any(need_w):
            dw = _mm(dy2.t(), x2, torch.float32 if len(set(wdts)) > 1 else wdts[0]).split(sizes)
            for i in range(n):
                if need_w[i]:
                    dws[i] = dw[i].new_zeros(shapes[i], dtype=wdts[i]).index_copy_(0, rows[i], dw[i].to(wdts[i]))
        if any(need_b):
            db = dy2.sum(0, dtype=torch.float32).split(sizes)
            for i in range(n):
                if need_b[i]:
                    dbs[i] = db[i].new_zeros(shapes[i][0], dtype=bdts[i]).index_copy_(0, rows[i], db[i].to(bdts[i]))
        return (dx, None, None, None, None, None, *dws, *dbs)


def gathered_linear(x: torch.Tensor, weights, biases, rows, dim: int = 0, cast: torch.Tensor | None = None,
                    rows_cat: torch.Tensor | None = None) -> torch.Tensor:
    """One GEMM over gathered weights (SAT's projections of the kept heads), one autograd node.

    ``dim=0``: ``cat([F.linear(x, w[r], b[r] if b is not None else None) for w, b, r in zip(weights, biases,
    rows)], -1)``; ``dim=1`` (one weight): ``F.linear(x, w[:, rows[0]], b)``. ``cast``: this forward's low-precision
    copy of the weights concatenated along dim 0 (Litespark's `cast_projection_weights` view), gathered instead of
    the master weights when in the compute dtype and that shape, with ``rows_cat`` (the rows in the concatenation:
    ``cat([r_0, r_1 + rows(w_0), ...])``; computed when not given)."""
    n = len(weights)
    if dim == 1 and n != 1:
        raise ValueError("a column gather takes one weight")
    if rows_cat is None:
        if dim == 1:
            rows_cat = rows[0]
        else:
            offsets, total = [], 0
            for w in weights:
                offsets.append(total)
                total += w.shape[0]
            rows_cat = torch.cat([r + o for r, o in zip(rows, offsets)])
    return _GatheredLinear.apply(x, dim, tuple(rows), rows_cat, cast, n, *weights, *biases)


def channel_mask(index: torch.Tensor, size: int, dtype=torch.bool) -> torch.Tensor:
    """``[size]`` mask that is 1 on ``index``."""
    mask = torch.zeros(size, dtype=dtype, device=index.device)
    mask[index] = 1
    return mask


def sparse_gated_mlp(
    x: torch.Tensor,
    w_gate: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    index: torch.Tensor | None,
    activation: str = "silu",
    *,
    return_hidden: bool = False,
):
    """Gated MLP over the channels ``index`` only (``None``: all channels, the dense MLP).

    Shapes: ``x [..., hidden]``, ``w_gate/w_up [inter, hidden]``, ``w_down [hidden, inter]``, ``index [k]``.
    With ``return_hidden=True`` also returns the ``[..., k]`` activation ``act(gate) * up`` (for importance scores).
    """
    act = _gated_act(activation)
    if index is None:
        h = act(F.linear(x, w_gate), F.linear(x, w_up))
        out = F.linear(h, w_down)
    else:
        h = act(F.linear(x, gather_weight(w_gate, index, 0)), F.linear(x, gather_weight(w_up, index, 0)))
        out = F.linear(h, gather_weight(w_down, index, 1))
    return (out, h) if return_hidden else out


_PACKED = {"silu": swiglu_packed, "gelu_tanh": geglu_packed}


def sparse_gated_mlp_fused(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                           index: torch.Tensor, activation: str = "silu", *, index2: torch.Tensor | None = None,
                           cast_gate_up: torch.Tensor | None = None, cast_down: torch.Tensor | None = None):
    """`sparse_gated_mlp` over ``index`` (not None) with ``return_hidden=True``, in three autograd nodes:
    ``(out, h)``.

    The same products as `sparse_gated_mlp`, as one `gathered_linear` over the kept rows of the packed
    ``[gate; up]``, the packed activation (`swiglu_packed` / `geglu_packed`) and one `gathered_linear` over the kept
    columns of ``down``: fewer launches and nodes than the per-weight gathers (~8 nodes per MLP). ``index2``:
    ``cat([index, index + inter])`` (rows of the packed ``[gate; up]``; computed when not given).
    ``cast_gate_up`` [2 * inter, hidden] / ``cast_down`` [hidden, inter]: this step's low-precision copies of the
    weights (Litespark's `cast_projection_weights` views) to gather from instead of the master weights (half the
    bytes; ignored unless in the compute dtype and that shape). ``h`` is returned detached (importance statistics).
    """
    packed = _PACKED.get(activation)
    if packed is None:
        _gated_act(activation)  # the error naming the known activations
    gate_up = gathered_linear(x, [w_gate, w_up], [None, None], [index, index], cast=cast_gate_up, rows_cat=index2)
    h = packed(gate_up)
    return gathered_linear(h, [w_down], [None], [index], dim=1, cast=cast_down), h.detach()


def sparse_gated_mlp_reference(x, w_gate, w_up, w_down, index, activation: str = "silu") -> torch.Tensor:
    """Dense gated MLP with the omitted channels zeroed (the oracle of `sparse_gated_mlp`)."""
    h = _act_reference(activation, F.linear(x, w_gate)) * F.linear(x, w_up)
    if index is not None:
        h = h * channel_mask(index, w_gate.shape[0], h.dtype)
    return F.linear(h, w_down)


def sparse_mlp(
    x: torch.Tensor,
    w_fc: torch.Tensor,
    b_fc: torch.Tensor | None,
    w_proj: torch.Tensor,
    b_proj: torch.Tensor | None,
    index: torch.Tensor | None,
    *,
    return_hidden: bool = False,
):
    """Non-gated GELU-tanh MLP (StarCoder2) over the channels ``index`` only; ``b_proj`` is added once, in full."""
    if index is None:
        h = gelu_tanh_bias(F.linear(x, w_fc), b_fc)
        out = F.linear(h, w_proj, b_proj)
    else:
        b = None if b_fc is None else gather_weight(b_fc, index, 0)
        h = gelu_tanh_bias(F.linear(x, gather_weight(w_fc, index, 0)), b)
        out = F.linear(h, gather_weight(w_proj, index, 1), b_proj)
    return (out, h) if return_hidden else out


def sparse_mlp_reference(x, w_fc, b_fc, w_proj, b_proj, index) -> torch.Tensor:
    h = F.gelu(F.linear(x, w_fc, b_fc), approximate="tanh")
    if index is not None:
        h = h * channel_mask(index, w_fc.shape[0], h.dtype)
    return F.linear(h, w_proj, b_proj)


def mean_abs_per_channel(h: torch.Tensor, row_weights: torch.Tensor | None = None,
                         count: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(|h|)`` over all leading dims, in float32, without a float32 copy of ``h`` (importance metric).

    ``row_weights`` (0 or 1 per row of the flattened leading dims) and ``count`` (their sum, a tensor): the mean over
    the rows weighted 1 only (a CUDA graph's bucket, whose filler rows hold anything)."""
    flat = h.detach().reshape(-1, h.shape[-1])
    if row_weights is None:
        return torch.linalg.vector_norm(flat, ord=1, dim=0, dtype=torch.float32) / max(flat.shape[0], 1)
    flat = flat * row_weights[:flat.shape[0], None].to(flat.dtype)  # 0 or 1: exact in any dtype
    return torch.linalg.vector_norm(flat, ord=1, dim=0, dtype=torch.float32) / count
