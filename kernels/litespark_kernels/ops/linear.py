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

from .._dispatch import _is_dtensor, autocast_dtype, device_supports

def fused_linear_reference(x: torch.Tensor, weights: Sequence[torch.Tensor],
                           biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    biases = list(biases) if biases is not None else [None] * len(weights)
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _mm_out_dtype_check(device: torch.device) -> bool:
    a = torch.ones(16, 16, device=device, dtype=torch.bfloat16)
    return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32


def _mm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b written in ``out_dtype`` (fp32 straight from the GEMM's accumulator where supported)."""
    if out_dtype == a.dtype:
        return torch.mm(a, b)
    if out_dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16) and a.is_cuda \
            and device_supports("mm_out_dtype", a.device, _mm_out_dtype_check):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).to(out_dtype)


def _compute_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    return autocast_dtype(x.device.type) or torch.promote_types(x.dtype, w.dtype)


def project_2d(x: torch.Tensor, w: torch.Tensor, biases, sizes, cdt: torch.dtype):
    """(x as [M, in] in ``cdt``, ``x w^T`` plus the biases, zeros where a weight has none, [M, sum(out)]): the GEMM
    of `_FusedLinear.forward` (also the torch.compile custom op's)."""
    x2 = x.reshape(-1, w.shape[1])
    if x2.dtype != cdt:
        x2 = x2.to(cdt)
    if any(b is not None for b in biases):
        b = torch.cat([bi.to(cdt) if bi is not None else torch.zeros(n, dtype=cdt, device=x.device)
                       for bi, n in zip(biases, sizes)])
        return x2, torch.addmm(b, x2, w.t())
    return x2, torch.mm(x2, w.t())


class _FusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, n_weights, w_cast, *params):
        weights, biases = params[:n_weights], params[n_weights:]
        w0 = weights[0]
        cdt = _compute_dtype(x, w0)
        sizes = [w.shape[0] for w in weights]
        k = w0.shape[1]
        n_out = sum(sizes)
        # Every operand below is already in cdt, so autocast (if on) changes nothing: no autocast-off context needed.
        if w_cast is not None and w_cast.dtype == cdt and w_cast.shape == (n_out, k):
            w = w_cast  # cast (and concatenated) once for the whole model by `cast_weights`
        elif n_weights == 1:
            w = w0 if w0.dtype == cdt else w0.to(cdt)
        else:  # one [sum(out), in] buffer written by one cast-and-concatenate (autocast casts each weight)
            w = torch.empty((n_out, k), dtype=cdt, device=x.device)
            torch.cat(weights, out=w)
        x2, y = project_2d(x, w, biases, sizes, cdt)
        ctx.save_for_backward(x2, w)
        ctx.meta = (x.shape, x.dtype, sizes, [wi.dtype for wi in weights],
                    [bi.dtype if bi is not None else None for bi in biases])
        return y.view(*x.shape[:-1], n_out)

    @staticmethod
    def backward(ctx, dy):
        x2, w = ctx.saved_tensors
        x_shape, x_dtype, sizes, w_dtypes, b_dtypes = ctx.meta
        n = len(sizes)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(w.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy2, w, x_dtype).view(x_shape)
        need_w = ctx.needs_input_grad[3:3 + n]
        need_b = ctx.needs_input_grad[3 + n:]
        dws = [None] * n
        if any(need_w):
            dtypes = {d for d, need in zip(w_dtypes, need_w) if need}
            gdt = dtypes.pop() if len(dtypes) == 1 else torch.float32
            dw = _mm(dy2.t(), x2, gdt)
            r = 0
            for i, rows in enumerate(sizes):
                if need_w[i]:
                    dws[i] = dw[r:r + rows] if dw.dtype == w_dtypes[i] else dw[r:r + rows].to(w_dtypes[i])
                r += rows
        dbs = [None] * n
        if any(need_b):
            db = dy2.sum(0, dtype=torch.float32)
            r = 0
            for i, rows in enumerate(sizes):
                if need_b[i]:
                    dbs[i] = db[r:r + rows].to(b_dtypes[i])
                r += rows
        return (dx, None, None, *dws, *dbs)


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
                 cast: torch.Tensor | None = None) -> torch.Tensor:
    """``cat([F.linear(x, w, b) for w, b in zip(weights, biases)], -1)`` as one GEMM (see the module docstring).

    Weights must share the input size (and dtype). Sharded parameters (FSDP2 DTensors, DeepSpeed ZeRO-3 partitions)
    take the reference path; FSDP2's gathered weights inside their unit's forward are plain tensors, and ZeRO-3's
    gathered for the running module are whole, so both are fused (`_gathered`). ``cast``: the weights already cast
    to the compute dtype and concatenated (a view returned by `cast_weights`), used instead of casting here; ignored
    when its dtype or shape does not fit.
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
    if torch.compiler.is_compiling():  # the same GEMMs as a torch.library custom op (traced, no graph break)
        from . import _custom_ops

        return _custom_ops.fused_linear(x, weights, biases, cast)
    return _FusedLinear.apply(x, n, cast, *weights, *biases)


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
