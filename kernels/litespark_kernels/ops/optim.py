"""AdamW (Loshchilov & Hutter 2019) over many tensors in one launch, optionally writing a low-precision copy of
each updated weight.

Per element, in fp32, exactly the update of ``torch.optim.AdamW`` (decoupled weight decay, bias correction,
``amsgrad=False``, ``maximize=False``):

    g  = grad / grad_scale                        (grad_scale: a device scalar, e.g. a folded clip factor; or 1)
    p  = p * (1 - lr * weight_decay)
    m  = m + (1 - beta1) * (g - m)                (= beta1 * m + (1 - beta1) * g)
    v  = beta2 * v + (1 - beta2) * g * g
    p  = p - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
    shadow = low_precision(p)                     (when a shadow tensor is given)

Frozen rows/columns (``frozen``): per tensor None or ``(dim, keep)``, ``keep`` a bool (or uint8) vector over
dimension ``dim`` (rows of a 2-D weight for dim 0, columns for dim 1). Elements whose index along ``dim`` is not
kept are left bit-for-bit untouched: weight, both moments and the shadow (the kernel neither reads nor writes
them); the kept elements get exactly the update they would get without a mask. The step count is the caller's and
is the same for the whole tensor (`LitesparkAdamW` advances it, like torch's step count). This is how SAT's
omitted weights stay frozen without a save-and-restore pass (`litespark_hf.sat`); no host sync is involved (the
masks are device tensors read by the kernel).

The shadow is what autocast would cast the weight to in the next forward: writing it here, while ``p`` is in
registers, replaces a separate pass that reads every fp32 weight again (see `litespark_hf.optim.LitesparkAdamW`).
The gradients are read, never written (torch's fused AdamW writes back grad / grad_scale).

`adamw_step` runs the Triton kernel (`_adamw_triton`) on CUDA tensors and `adamw_step_reference` (torch ops, one
tensor at a time) elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._dispatch import run_triton, use_triton


def _inspect(params, grads, exp_avgs, exp_avg_sqs, shadows) -> bool:
    """Validate the lists (ValueError on a length or shape mismatch) in one pass; returns whether the Triton kernel
    takes them (contiguous fp32 tensors on one device; shadows bf16 or fp16, all of one dtype)."""
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n) or (shadows is not None and len(shadows) != n):
        raise ValueError("params, grads, exp_avgs, exp_avg_sqs (and shadows) must have the same length")
    device = params[0].device if n else None
    kernel_ok, s_dtype = True, None
    for i in range(n):
        p = params[i]
        s = shadows[i] if shadows is not None else None
        for name, t in (("param", p), ("grad", grads[i]), ("exp_avg", exp_avgs[i]), ("exp_avg_sq", exp_avg_sqs[i]),
                        ("shadow", s)):
            if t is None:
                continue
            if t.shape != p.shape:
                raise ValueError(f"{name} of shape {tuple(t.shape)} for a parameter of shape {tuple(p.shape)}")
            if t is s:
                s_dtype = s_dtype or s.dtype
                wanted_dtype = s_dtype if s_dtype in (torch.bfloat16, torch.float16) else None
            else:
                wanted_dtype = torch.float32
            if kernel_ok and (t.dtype != wanted_dtype or t.device != device or not t.is_contiguous()):
                kernel_ok = False
    return kernel_ok


# the kernel indexes a mask in int32 with up to a block (<= 2**16 elements) past the row length or mask length
_I32_ROOM = 2**31 - 2**16 - 1


def _check_frozen(params, frozen) -> tuple[list | None, bool]:
    """Validate ``frozen`` (ValueError); returns it with non-negative dims (None when nothing is frozen) and
    whether the Triton kernel's index arithmetic covers every mask."""
    if frozen is None:
        return None, True
    if len(frozen) != len(params):
        raise ValueError("frozen must have one entry (None or (dim, keep)) per parameter")
    out, fits, any_mask = [], True, False
    for p, f in zip(params, frozen):
        if f is None:
            out.append(None)
            continue
        dim, keep = f
        nd = p.dim()
        if not isinstance(dim, int) or not -nd <= dim < nd:
            raise ValueError(f"frozen dim {dim!r} for a parameter of shape {tuple(p.shape)}")
        dim %= nd
        if not torch.is_tensor(keep) or keep.dim() != 1 or keep.numel() != p.shape[dim] \
                or keep.dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"frozen keep mask must be a bool/uint8 vector of length {p.shape[dim]} (dim {dim} of "
                             f"shape {tuple(p.shape)})")
        inner = math.prod(p.shape[dim + 1:])
        fits = fits and inner < _I32_ROOM and p.shape[dim] < _I32_ROOM
        out.append((dim, keep))
        any_mask = True
    return (out if any_mask else None), fits


def _put(t: torch.Tensor, new: torch.Tensor, keep: torch.Tensor | None) -> None:
    t.copy_(new if keep is None else torch.where(keep, new.to(t.dtype), t))


def _reference(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale,
               shadows, frozen=None) -> None:
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    with torch.no_grad():
        for i, p in enumerate(params):
            cdt = torch.promote_types(p.dtype, torch.float32)  # fp32 math (float64 for an oracle)
            g = grads[i].to(cdt)
            if grad_scale is not None:
                g = g / grad_scale.to(cdt)
            pf = p.to(cdt)
            m, v = exp_avgs[i], exp_avg_sqs[i]
            f = frozen[i] if frozen is not None else None
            if f is not None:  # the same ops out of place, then only the kept elements written back
                dim, keep = f
                view = [1] * p.dim()
                view[dim] = -1
                keep = keep.to(device=p.device, dtype=torch.bool).reshape(view)
                pf = pf * (1.0 - lr * weight_decay)
                m_new = m + (g - m) * (1.0 - beta1)
                v_new = v * beta2 + g * g * (1.0 - beta2)
                pf = pf - (lr / bc1) * m_new / (v_new.sqrt() / bc2_sqrt + eps)
                _put(m, m_new, keep)
                _put(v, v_new, keep)
                _put(p, pf, keep)
                if shadows is not None and shadows[i] is not None:
                    _put(shadows[i], pf, keep)
                continue
            pf = pf * (1.0 - lr * weight_decay)
            m.add_((g - m) * (1.0 - beta1))
            v.mul_(beta2).add_(g * g * (1.0 - beta2))
            pf = pf - (lr / bc1) * m / (v.sqrt() / bc2_sqrt + eps)
            p.copy_(pf)
            if shadows is not None and shadows[i] is not None:
                shadows[i].copy_(pf)


def adamw_step_reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                         exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor], *, lr: float,
                         beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                         grad_scale: torch.Tensor | None = None,
                         shadows: Sequence[torch.Tensor | None] | None = None,
                         frozen: Sequence[tuple[int, torch.Tensor] | None] | None = None) -> None:
    """One AdamW step in place, torch ops per tensor (the specification and the CPU path)."""
    _inspect(params, grads, exp_avgs, exp_avg_sqs, shadows)
    frozen, _ = _check_frozen(params, frozen)
    _reference(params, grads, exp_avgs, exp_avg_sqs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
               weight_decay=weight_decay, step=step, grad_scale=grad_scale, shadows=shadows, frozen=frozen)


def adamw_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
               exp_avg_sqs: Sequence[torch.Tensor], *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, grad_scale: torch.Tensor | None = None,
               shadows: Sequence[torch.Tensor | None] | None = None,
               frozen: Sequence[tuple[int, torch.Tensor] | None] | None = None, cache: dict | None = None) -> None:
    """One AdamW step in place over every tensor (all at the same ``step``); see the module docstring.

    ``shadows``: per parameter a bf16/fp16 tensor of the same shape (or None) that receives the updated weight.
    ``frozen``: per parameter None or ``(dim, keep)``: ``keep`` a bool/uint8 vector of length ``shape[dim]``;
    the elements at unkept indices along ``dim`` (and their moments and shadow) are left bit-for-bit untouched.
    ``cache``: a dict kept by the caller between steps (the kernel's block and address tables).
    The Triton kernel takes contiguous fp32 parameters, gradients and moments on one CUDA device; anything else
    runs the reference.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    kernel_ok = _inspect(params, grads, exp_avgs, exp_avg_sqs, shadows)
    frozen, fits = _check_frozen(params, frozen)
    kernel_ok = kernel_ok and fits
    if not params:
        return
    kw = dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
              weight_decay=float(weight_decay), step=int(step), grad_scale=grad_scale, shadows=shadows,
              frozen=frozen)
    if kernel_ok and use_triton("adamw", params[0], grads[0]):
        run_triton("_adamw_triton", "adamw_step_triton", params, grads, exp_avgs, exp_avg_sqs,
                   cache=cache if cache is not None else {}, **kw)
        return
    _reference(params, grads, exp_avgs, exp_avg_sqs, **kw)
