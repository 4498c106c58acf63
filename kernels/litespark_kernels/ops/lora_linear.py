"""A group of frozen projections with their LoRA adapters as ONE autograd node: four GEMMs forward, five backward.

``lora_linear(x, weights, biases, a_weights, b_weights, scalings, slots)`` =
``cat([F.linear(x, w_i, b_i) for i], -1)`` plus, for each adapter j, ``(x A_j^T) B_j^T * scalings[j]`` added to
the output columns of projection ``slots[j]`` (the reference, `lora_linear_reference`; LoRA without dropout, under
autocast's casting rules like `fused_linear`).

PEFT computes each adapter as its own modules (two small GEMMs, a multiply, an add and a cast per projection), so a
q/k/v group with three adapters is ~14 autograd nodes per forward, each with its own backward, and on a host-bound
step their Python is the cost. Here:

- forward: ``y = x W^T (+ bias)``, ``h = x A^T`` for all adapters at once (A stacked: [sum r, in]),
  ``y += (h * s) Bbd^T`` in place (``addmm_``), Bbd the adapters' B's placed block-diagonally in an
  [sum out, sum r] matrix (zeros elsewhere: the waste is sum(out) x sum(r) x tokens multiply-adds, ~1-2% of the
  base GEMM at r=16);
- backward: ``dx = dy W + ((dy Bbd) * s) A``, ``dA = ((dy Bbd) * s)^T x``, ``dB`` the diagonal blocks of
  ``dy^T (h * s)``; the frozen base weights get no gradient (the op requires them frozen).

Values: the same products as PEFT's; the rounding differs where PEFT rounds in between (its adapter output is
rounded to the compute dtype before the add, here the add happens in the GEMM's fp32 accumulator) - in fp32 the
two agree to rounding, in bf16 this is the more accurate one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .linear import _compute_dtype, _mm, bias_vector, group_weight


def lora_linear_reference(x, weights, biases, a_weights, b_weights, scalings, slots) -> torch.Tensor:
    """PEFT's composition: each projection's ``base(x) + lora_B(lora_A(x)) * scaling``, concatenated."""
    biases = list(biases) if biases is not None else [None] * len(weights)
    outs = [F.linear(x, w, b) for w, b in zip(weights, biases)]
    for a, b, s, slot in zip(a_weights, b_weights, scalings, slots):
        outs[slot] = outs[slot] + F.linear(F.linear(x, a), b) * s
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _layout(sizes, ranks, slots):
    """(row offset of each adapter's projection, column offset of each adapter in the stacked rank dimension)."""
    row_starts = [sum(sizes[:i]) for i in range(len(sizes))]
    col = [sum(ranks[:j]) for j in range(len(ranks))]
    return [row_starts[s] for s in slots], col


_SCALINGS: dict = {}


def _scaling_vector(ranks: tuple, scalings: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Each adapter's scaling repeated over its rank, [sum r] in ``dtype``: the same for every call of a group, so
    made once per (ranks, scalings, dtype, device) instead of a fill and a concatenation per forward."""
    key = (ranks, scalings, dtype, device)
    vec = _SCALINGS.get(key)
    if vec is None:
        vec = _SCALINGS[key] = torch.cat([torch.full((r,), s, dtype=dtype, device=device)
                                          for r, s in zip(ranks, scalings)])
    return vec


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, meta, w_cast, *params):
        n_w, n_a, sizes, scalings, slots = meta
        weights, biases = params[:n_w], params[n_w:2 * n_w]
        a_ws, b_ws = params[2 * n_w:2 * n_w + n_a], params[2 * n_w + n_a:]
        cdt = _compute_dtype(x, weights[0])
        k = weights[0].shape[1]
        x2 = x.reshape(-1, k)
        if x2.dtype != cdt:
            x2 = x2.to(cdt)
        w = group_weight(weights, w_cast, cdt, x.device)
        b = bias_vector(biases, sizes, cdt, x.device)
        y = torch.mm(x2, w.t()) if b is None else torch.addmm(b, x2, w.t())
        ranks = [a.shape[0] for a in a_ws]
        # one cast of the stacked A's (two launches) instead of one per adapter and a concatenation
        same = all(ai.dtype == a_ws[0].dtype for ai in a_ws)
        a = (torch.cat(a_ws) if same else torch.cat([ai.to(cdt) for ai in a_ws])) if n_a > 1 else a_ws[0]
        a = a.to(cdt)
        h = torch.mm(x2, a.t())
        svec = _scaling_vector(tuple(ranks), scalings, cdt, x.device)
        hs = h * svec
        rows, cols = _layout(sizes, ranks, slots)
        bbd = torch.zeros(w.shape[0], sum(ranks), dtype=cdt, device=x.device)
        for bj, r0, c0, r in zip(b_ws, rows, cols, ranks):
            bbd[r0:r0 + bj.shape[0], c0:c0 + r] = bj
        y.addmm_(hs, bbd.t())
        ctx.save_for_backward(x2, w, a, bbd, hs, svec)
        ctx.meta = (x.shape, x.dtype, ranks, rows, cols, [ai.dtype for ai in a_ws], [bj.dtype for bj in b_ws],
                    [bj.shape[0] for bj in b_ws], n_w)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, w, a, bbd, hs, svec = ctx.saved_tensors
        x_shape, x_dtype, ranks, rows, cols, a_dtypes, b_dtypes, b_rows, n_w = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        if dy2.dtype != w.dtype:
            dy2 = dy2.to(w.dtype)
        dh = torch.mm(dy2, bbd) * svec  # d(x A^T): through B and the scaling
        dx = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy2, w, x_dtype)
            if dx.dtype == dh.dtype:
                dx.addmm_(dh, a)
            else:
                dx.add_(_mm(dh, a, dx.dtype))
            dx = dx.view(x_shape)
        need = ctx.needs_input_grad[3 + 2 * n_w:]
        n_a = len(ranks)
        d_a = [None] * n_a
        d_b = [None] * n_a
        if any(need[:n_a]):
            da = _mm(dh.t(), x2, torch.float32 if len(set(a_dtypes)) > 1 else a_dtypes[0])
            for j, (c0, r) in enumerate(zip(cols, ranks)):
                if need[j]:
                    d_a[j] = da[c0:c0 + r].to(a_dtypes[j])
        if any(need[n_a:]):
            db = _mm(dy2.t(), hs, torch.float32 if len(set(b_dtypes)) > 1 else b_dtypes[0])
            for j, (r0, c0, r, nr) in enumerate(zip(rows, cols, ranks, b_rows)):
                if need[n_a + j]:
                    d_b[j] = db[r0:r0 + nr, c0:c0 + r].to(b_dtypes[j])
        return (dx, None, None, *([None] * (2 * n_w)), *d_a, *d_b)


def lora_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None,
                a_weights: Sequence[torch.Tensor], b_weights: Sequence[torch.Tensor], scalings: Sequence[float],
                slots: Sequence[int], cast: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring. ``weights``/``biases``: the group's frozen base projections (requires_grad
    False); ``a_weights[j]`` [r_j, in] and ``b_weights[j]`` [out of projection slots[j], r_j]: adapter j, added to
    projection ``slots[j]`` times ``scalings[j]``; ``cast``: the base weights already cast and concatenated
    (`fused_linear`'s ``cast``)."""
    n = len(weights)
    if n == 0 or not a_weights:
        raise ValueError("lora_linear needs base weights and at least one adapter")
    biases = tuple(biases) if biases is not None else (None,) * n
    if len(biases) != n or not (len(a_weights) == len(b_weights) == len(scalings) == len(slots)):
        raise ValueError("lora_linear: one bias per weight, and one B, scaling and slot per A")
    if any(p is not None and p.requires_grad for p in (*weights, *biases)):
        raise ValueError("lora_linear: the base weights must be frozen (requires_grad=False)")
    sizes = [w.shape[0] for w in weights]
    for a, b, slot in zip(a_weights, b_weights, slots):
        if a.shape[1] != x.shape[-1] or b.shape != (sizes[slot], a.shape[0]):
            raise ValueError(f"adapter of shapes A {tuple(a.shape)}, B {tuple(b.shape)} does not fit projection "
                             f"{slot} ({sizes[slot]} x {x.shape[-1]})")
    meta = (n, len(a_weights), sizes, tuple(float(s) for s in scalings), tuple(slots))
    return _LoraLinear.apply(x, meta, cast, *weights, *biases, *a_weights, *b_weights)
