"""Projections for mixed-precision training: several weights reading one input as ONE GEMM, gradients written by
the GEMM in the dtype they are needed in.

``fused_linear(x, [w1, w2, ...], [b1, b2, ...])`` = ``cat([F.linear(x, w1, b1), F.linear(x, w2, b2), ...], -1)``
(the reference, ``fused_linear_reference``), with the semantics of ``F.linear`` under autocast: inputs and weights
are cast to the autocast dtype, the output has that dtype.

What stock autocast training does around a Linear with fp32 master weights, and what this does instead:

- stock casts the input to bf16 once per Linear (q, k and v each cast the same fp32 normed activation); here once
  per group;
- stock's backward gets the input gradient in bf16 from each GEMM, casts each to fp32 and adds them up (q + k + v,
  gate + up); here one GEMM over the concatenated weights writes it, accumulated in fp32 inside the GEMM and
  written in the input's dtype (``mm(..., out_dtype=float32)``);
- stock's weight gradient is a bf16 GEMM output cast to fp32 afterwards; here the GEMM writes fp32 directly.
So the forward values are the same as stock's (one bf16 GEMM per output column), and the gradients skip a bf16
rounding that stock makes (closer to the fp32 result). Fewer kernels run: per Llama layer, 3 input casts, 5
gradient casts, 3 additions and 5 weight-gradient casts fewer; the GEMMs are the same size in total.

The weights' gradients are row blocks of one buffer (views), which autograd stores as each ``.grad``.
Works on any device (it is cuBLAS / ATen); on devices whose ``mm`` lacks ``out_dtype`` the product is cast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .._dispatch import _is_dtensor, autocast_dtype, device_supports, note_once
from . import fp8

def fused_linear_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                           biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    biases = list(biases) if biases is not None else [None] * len(weights)
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _mm_out_dtype_check(device: torch.device) -> bool:
    a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
    return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b written in ``out_dtype`` (fp32 straight from the GEMM's accumulator where supported); into ``out`` when
    given (of that dtype and shape)."""
    if out_dtype == a.dtype:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    if out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda \
            and device_supports("mm_out_dtype", a.device, _mm_out_dtype_check):
        return torch.mm(a, b, out_dtype=torch.float32) if out is None \
            else torch.mm(a, b, out_dtype=torch.float32, out=out)
    return torch.mm(a, b).to(out_dtype) if out is None else out.copy_(torch.mm(a, b))


# Where a fused group's weight gradients go, by the group's weights (their ids, in order): one buffer
# [sum of rows, in features] whose row blocks are the weights' gradient buffers. Set only while `litespark_hf.graphs`
# captures a backward, so that the captured weight-gradient GEMM writes each step's gradients in place instead of into
# a graph-private tensor copied out afterwards. Empty otherwise (nothing changes).
GRAD_DESTINATIONS: dict = {}


def _grad_destination(ctx, weights) -> None:
    ctx.grad_out = GRAD_DESTINATIONS.get(tuple(id(w) for w in weights)) if GRAD_DESTINATIONS else None


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return autocast_dtype(x.device.type) or torch.promote_types(x.dtype, w.dtype)


def project_2d(x: torch.Tensor, w: torch.Tensor, biases, sizes, cdt: torch.dtype):
    """(x as [M, in] in ``cdt``, ``x w^T`` plus the biases, zeros where a weight has none, [M, sum(out)]): the GEMM
    of `_FusedLinear.forward` (also the torch.compile custom op's)."""
    x2 = x.reshape(-1, w.shape[1])
    if x2.dtype != cdt:
        x2 = x2.to(cdt)
    b = bias_vector(biases, sizes, cdt, x.device)
    return x2, (torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t()))


def bias_vector(biases, sizes, cdt: torch.dtype, device) -> torch.Tensor | None:
    """The group's biases as one [sum(sizes)] vector in ``cdt`` (zeros where a weight has none); None without any."""
    if all(b is None for b in biases):
        return None
    return torch.cat([bi.to(cdt) if bi is not None else torch.zeros(n, dtype=cdt, device=device)
                      for bi, n in zip(biases, sizes)])


def group_weight(weights, w_cast, cdt: torch.dtype, device) -> torch.Tensor:
    """The group's weights as one [sum(out), in] matrix in ``cdt``: ``w_cast`` when it is that (cast and
    concatenated once for the whole model by `cast_weights`), else one cast (-and-concatenate)."""
    w0 = weights[0]
    n_out, k = sum(w.shape[0] for w in weights), w0.shape[1]
    # Every operand is then in cdt, so autocast (if on) changes nothing: no autocast-off context needed.
    if w_cast is not None and w_cast.dtype == cdt and w_cast.shape == (n_out, k):
        return w_cast
    if len(weights) == 1:
        return w0 if w0.dtype == cdt else w0.to(cdt)
    w = torch.empty((n_out, k), dtype=cdt, device=device)  # one cast-and-concatenate (autocast casts each weight)
    torch.cat(weights, out=w)
    return w


def _weight_grads(ctx, n: int, sizes, w_dtypes, gemm) -> list:
    """Each needed weight's gradient: row blocks of one ``gemm(dtype, out)`` output (fp32 when the weights' dtypes
    differ; ``out``: the group's `GRAD_DESTINATIONS` buffer when it has one and every weight needs its gradient)."""
    need_w = ctx.needs_input_grad[3:3 + n]
    dws = [None] * n
    if any(need_w):
        dtypes = {d for d, need in zip(w_dtypes, need_w) if need}
        gdt = dtypes.pop() if len(dtypes) == 1 else torch.float32
        dest = getattr(ctx, "grad_out", None)
        if dest is not None and not (all(need_w) and dest.dtype == gdt):
            dest = None
        dw = gemm(gdt, dest)
        r = 0
        for i, rows in enumerate(sizes):
            if need_w[i]:
                dws[i] = dw[r:r + rows] if dw.dtype == w_dtypes[i] else dw[r:r + rows].to(w_dtypes[i])
            r += rows
    return dws


def _bias_grads(ctx, n: int, sizes, b_dtypes, dy2: torch.Tensor) -> list:
    need_b = ctx.needs_input_grad[3 + n:]
    dbs = [None] * n
    if any(need_b):
        db = dy2.sum(0, dtype=torch.float32)
        r = 0
        for i, rows in enumerate(sizes):
            if need_b[i]:
                dbs[i] = db[r:r + rows].to(b_dtypes[i])
            r += rows
    return dbs


def _setup(ctx, x, n_weights, w_cast, params):
    """The forward's common start: (biases, compute dtype, the group's weight matrix in it); ``ctx.meta`` set."""
    weights, biases = params[:n_weights], params[n_weights:]
    cdt = _compute_dtype(x, weights[0])
    ctx.meta = (x.shape, x.dtype, [w.shape[0] for w in weights], [wi.dtype for wi in weights],
                [bi.dtype if bi is not None else None for bi in biases])
    return biases, cdt, group_weight(weights, w_cast, cdt, x.device)


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n_weights, w_cast, *params):
        biases, cdt, w = _setup(ctx, x, n_weights, w_cast, params)
        _grad_destination(ctx, params[:n_weights])
        x2, y = project_2d(x, w, biases, ctx.meta[2], cdt)
        ctx.save_for_backward(x2, w)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        x_shape, x_dtype, sizes, w_dtypes, b_dtypes = ctx.meta
        n = len(sizes)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        dx = _mm(dy2, w, x_dtype).view(x_shape) if ctx.needs_input_grad[0] else None
        dws = _weight_grads(ctx, n, sizes, w_dtypes, lambda gdt, out: _mm(dy2.t(), x2, gdt, out))
        return (dx, None, None, *dws, *_bias_grads(ctx, n, sizes, b_dtypes, dy2))


class _FusedLinearFP8(torch.autograd.Function):
    """`_FusedLinear` with its three GEMMs in float8 (`litespark_kernels.ops.fp8`: e4m3 x and w, e5m2 dy,
    tensorwise dynamic scales, the token dimension padded to a multiple of 16)."""

    @staticmethod
    def forward(ctx, x, n_weights, w_cast, *params):
        biases, cdt, w = _setup(ctx, x, n_weights, w_cast, params)
        x2 = x.reshape(-1, w.shape[1])
        if x2.dtype != cdt:
            x2 = x2.to(cdt)
        m = x2.shape[0]
        need_w = any(ctx.needs_input_grad[3:3 + n_weights])  # frozen weights (a LoRA base): no x^T for a dW GEMM
        xq, xqt, x_inv = fp8.quantize(x2, fp8.E4M3, fp8.ALIGN, transposed=need_w)
        wq, wqt, w_inv = fp8.quantize(w, fp8.E4M3, transposed=ctx.needs_input_grad[0])
        y = fp8.scaled_mm(xq, wq, x_inv, w_inv, cdt, fast_accum=True)[:m]
        b = bias_vector(biases, ctx.meta[2], cdt, x.device)
        if b is not None:
            y = y + b
        ctx.save_for_backward(xqt, wqt, x_inv, w_inv)
        ctx.cdt = cdt
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xqt, wqt, x_inv, w_inv = ctx.saved_tensors
        x_shape, x_dtype, sizes, w_dtypes, b_dtypes = ctx.meta
        n = len(sizes)
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != ctx.cdt:
            dy2 = dy2.to(ctx.cdt)
        m = dy2.shape[0]
        need_w = any(ctx.needs_input_grad[3:3 + n])
        dyq, dyqt, dy_inv = fp8.quantize(dy2, fp8.E5M2, fp8.ALIGN, transposed=need_w)
        dx = None
        if ctx.needs_input_grad[0]:  # dy [M', N] @ w [N, K]: w read column-major from its transposed copy
            dx = fp8.scaled_mm(dyq, wqt, dy_inv, w_inv, x_dtype)[:m].view(x_shape)
        # dy^T [N, M'] @ x [M', K]; the padded rows of both are zero
        dws = _weight_grads(ctx, n, sizes, w_dtypes, lambda gdt, out: fp8.scaled_mm(dyqt, xqt, dy_inv, x_inv, gdt))
        return (dx, None, None, *dws, *_bias_grads(ctx, n, sizes, b_dtypes, dy2))


def _plain_tensor(t: torch.Tensor | None) -> bool:
    """The whole tensor, usable as it is right now (None counts as plain).

    FSDP2 (``fully_shard``) registers a unit's gathered weights as plain ``nn.Parameter``s from the unit's
    pre-forward until it reshards (after its forward, or after its backward) and the sharded DTensors otherwise. So
    inside a decoder layer's forward (per-layer units, what accelerate's TRANSFORMER_BASED_WRAP makes) the layer's
    projection weights are plain and take the fused GEMMs, while the other units' weights seen from there (the next
    layer's norm; every layer's weights at the root's forward, where `cast_projection_weights` looks) are DTensors,
    which are not plain: `fused_linear` runs the torch reference on them. With the root as the only unit, every
    weight is plain from the root's pre-forward to the end of its backward. DeepSpeed ZeRO-3 parameters (``ds_id``)
    are never plain here, whether gathered or not (`_gathered` tells the two apart where a caller can use them).
    """
    return t is None or (not _is_dtensor(t) and not hasattr(t, "ds_id"))


def _gathered(t: torch.Tensor | None) -> bool:
    """`_plain_tensor`, or a DeepSpeed ZeRO-3 parameter that is whole right now and held so for the running module:
    ``AVAILABLE`` and persistent or in use by an active sub-module (its own, or one it is registered on as an external
    parameter: `litespark_hf.sharding`), so that it is gathered again for that module's backward."""
    if _plain_tensor(t):
        return True
    status = getattr(t, "ds_status", None)
    return getattr(status, "name", None) == "AVAILABLE" and (
        bool(getattr(t, "ds_persist", False)) or bool(getattr(t, "ds_active_sub_modules", None)))


def fused_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor | None] | None = None,
                 cast: torch.Tensor | None = None, fp8: bool = False) -> torch.Tensor:
    """``cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` as one GEMM (see the module docstring).

    Weights must share the input size (and dtype). Sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions)
    take the reference path; FSDP2's gathered weights inside their unit's forward are plain tensors, and ZeRO-3's
    gathered for the running module are whole, so both are fused (`_gathered`). ``cast``: the weights already cast
    to the compute dtype and concatenated (a view returned by `cast_weights`), used instead of casting here; ignored
    when its dtype or shape does not fit.

    ``fp8``: the GEMMs in float8 (`litespark_kernels.ops.fp8`) where this projection can take them (bf16/fp16
    compute, feature counts in multiples of 16, a device with float8 GEMMs); otherwise it runs as without ``fp8``,
    with a one-time warning naming the reason. Sharded weights take the reference path (bf16) as above, and under
    ``torch.compile`` the float8 Function is called eagerly (a graph break, same values).
    """
    n = len(weights)
    if n == 0:
        raise ValueError("no weights")
    if biases is None:
        biases = (None,) * n
    elif len(biases) != n:
        raise ValueError(f"{n} weights but {len(biases)} biases")
    k = x.shape[-1]
    dtype = weights[0].dtype
    for w in weights:
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not take inputs of size {k}")
        if w.dtype != dtype or not _gathered(w):
            return fused_linear_reference(x, weights, biases)
    for b in biases:
        if not _gathered(b):
            return fused_linear_reference(x, weights, biases)
    if fp8 and _fp8_usable(x, weights):
        if torch.compiler.is_compiling():
            return _fp8_eager(x, n, cast, *weights, *biases)
        return _FusedLinearFP8.apply(x, n, cast, *weights, *biases)
    if torch.compiler.is_compiling():  # the same GEMMs as a torch.library custom op (traced, no graph break)
        from . import _custom_ops

        return _custom_ops.fused_linear(x, weights, biases, cast)
    return _FusedLinear.apply(x, n, cast, *weights, *biases)


def _fp8_usable(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    why = fp8.unsupported_reason(x, weights[0].shape[1], sum(w.shape[0] for w in weights),
                                 _compute_dtype(x, weights[0]))
    if why is None:
        return True
    note_once("fp8", f"float8 projections: {why}; those projections run in the compute dtype instead")
    return False


@torch.compiler.disable
def _fp8_eager(x, n, cast, *params):
    return _FusedLinearFP8.apply(x, n, cast, *params)


def weight_views(views: Sequence[torch.Tensor], groups: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """The row block of each weight inside its group's view (as `cast_weights` lays them out), in group order."""
    out = []
    for view, g in zip(views, groups):
        out.extend(view.split([w.shape[0] for w in g]) if len(g) > 1 else (view,))
    return out


def cast_weights(groups: Sequence[Sequence[torch.Tensor]], dtype: torch.dtype,
                 out: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Each group of weights cast to ``dtype`` and concatenated along the output dimension, all in one buffer.

    Returns one ``[sum(rows), in]`` view per group (for `fused_linear`'s ``cast``). One allocation and one
    ``_foreach_copy_`` for the whole list, instead of a cast (or cast-and-concatenate) per projection per forward:
    the same values as autocast's casts, far fewer kernel launches. The views are fresh on every call, so a graph
    that saved an earlier call's views is never overwritten. ``out``: the views of an earlier call to write into
    instead (in place: refilling a persistent copy).
    """
    if not groups:
        return []
    if out is None:
        flat_sizes, shapes = [], []
        for g in groups:
            rows, k = sum(w.shape[0] for w in g), g[0].shape[1]
            flat_sizes.append(rows * k)
            shapes.append((rows, k))
        flat = torch.empty(sum(flat_sizes), dtype=dtype, device=groups[0][0].device)
        out = [c.view(shape) for c, shape in zip(flat.split(flat_sizes), shapes)]
    with torch.no_grad():
        torch._foreach_copy_(weight_views(out, groups), [w for g in groups for w in g])
    return list(out)
