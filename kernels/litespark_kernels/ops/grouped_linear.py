"""Grouped linear: one projection per group of rows (the expert MLPs of a mixture-of-experts layer).

``x`` [S, K] holds rows sorted by group (expert); ``offsets`` [G] int32 are the cumulative row counts (group ``g``
owns rows ``offsets[g-1]:offsets[g]``, an empty group has ``offsets[g] == offsets[g-1]``); ``weight`` is [G, N, K]
(``nn.Linear`` layout, Mixtral / Qwen-MoE experts) or, with ``transposed=True``, [G, K, N] (GPT-OSS experts);
``bias`` [G, N] or None. Then, for every group ``g`` and its rows ``r``::

    out[r] = x[r] @ weight[g].T + bias[g]          (transposed: x[r] @ weight[g] + bias[g])

Semantics of ``F.linear`` under autocast: inputs, weights and bias are cast to the autocast dtype, the output has
that dtype; otherwise ``x`` is cast to the weight's dtype (as transformers' grouped_mm experts do).

`grouped_linear_reference` loops over the groups (the specification and the CPU path; it reads the offsets on the
host). `grouped_linear` on CUDA, in bfloat16, with 16-byte aligned rows, runs ONE grouped GEMM for all groups:
torch's own ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm`` on torch versions without it), which takes
the offsets on the device (no host sync) and has its own autograd (the weight gradient is a grouped GEMM too).
Elsewhere (fp16 / fp32 on CUDA, where torch's grouped GEMM would itself loop with a host sync, unaligned sizes,
the CPU) the reference runs, with a one-time warning on CUDA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import autocast_dtype, warn_once

_TORCH_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _prepare(x, weight, bias):
    """Cast to the compute dtype: the autocast dtype when autocast is on, else the weight's."""
    dtype = autocast_dtype(x.device.type) or weight.dtype
    x = x.to(dtype)
    weight = weight.to(dtype)
    bias = bias.to(dtype) if bias is not None else None
    return x, weight, bias


def group_of_rows(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The group index of each of ``rows`` sorted rows, from the cumulative ``offsets`` (on the device, no sync)."""
    return torch.searchsorted(offsets, torch.arange(rows, device=offsets.device, dtype=offsets.dtype), right=True)


class _GroupBias(torch.autograd.Function):
    """``out + bias[groups]`` in ``out``'s dtype; the bias gradient summed per group in float32 and returned in the
    bias's own dtype (autograd's index_select backward would accumulate it in the low-precision cast)."""

    @staticmethod
    def forward(ctx, out, bias, groups):
        ctx.save_for_backward(groups)
        ctx.bias_meta = (bias.shape, bias.dtype)
        return out + bias.to(out.dtype).index_select(0, groups)

    @staticmethod
    def backward(ctx, dy):
        (groups,) = ctx.saved_tensors
        shape, dtype = ctx.bias_meta
        db = None
        if ctx.needs_input_grad[1]:
            db = torch.zeros(shape, dtype=torch.float32, device=dy.device).index_add_(0, groups, dy.float())
            db = db.to(dtype)
        return dy, db, None


def _add_bias(out, bias, offsets, groups):
    """``bias`` uncast (its gradient comes back in its own dtype, accumulated in float32)."""
    if bias is None:
        return out
    if groups is None:
        groups = group_of_rows(offsets, out.shape[0])
    return _GroupBias.apply(out, bias, groups)


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                             bias: torch.Tensor | None = None, *, transposed: bool = False,
                             groups: torch.Tensor | None = None) -> torch.Tensor:
    """Loop over the groups: ``x[rows of g] @ weight[g].T (+ bias[g])``. Rows past ``offsets[-1]`` give zeros.
    ``groups`` (the group of each row) is accepted for the dispatcher's signature and not needed here."""
    x, weight, bias = _prepare(x, weight, bias)
    n_out = weight.shape[2] if transposed else weight.shape[1]
    pieces, start = [], 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            w = weight[g].t() if transposed else weight[g]
            pieces.append(F.linear(x[start:end], w, bias[g] if bias is not None else None))
        start = end
    if start < x.shape[0] or not pieces:
        pieces.append(x.new_zeros(x.shape[0] - start, n_out))
    return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]


def _fast_path(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """torch's grouped GEMM without a host sync: CUDA, bf16 compute dtype (its only fast kernel; other dtypes loop
    with a host sync inside torch), 16-byte aligned rows of both operands, sm90+."""
    if not x.is_cuda:
        return False
    if _TORCH_GROUPED_MM is None:
        warn_once("grouped_linear", "this torch has no grouped GEMM")
        return False
    if dtype != torch.bfloat16:
        warn_once("grouped_linear", f"torch's grouped GEMM runs without a host sync in bfloat16 only, got {dtype}")
        return False
    if x.shape[1] % 8 or weight.shape[1] % 8 or weight.shape[2] % 8:
        warn_once("grouped_linear", "grouped GEMM dimensions must be multiples of 8 (16-byte rows)")
        return False
    if torch.cuda.get_device_capability(x.device) < (9, 0):
        warn_once("grouped_linear", "torch's fast grouped GEMM needs an sm90+ GPU")
        return False
    return True


def grouped_linear_grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                              bias: torch.Tensor | None = None, *, transposed: bool = False,
                              groups: torch.Tensor | None = None) -> torch.Tensor:
    """The grouped linear as ONE call of torch's grouped GEMM (offsets read on the device), the bias added per row.
    The CUDA bf16 path of `grouped_linear`; callable on any device torch's kernel supports (the CPU, in fp32, with
    16-byte aligned rows: what the tests use to check the layout). Rows past ``offsets[-1]`` are left undefined."""
    if _TORCH_GROUPED_MM is None:
        raise RuntimeError("this torch has no grouped GEMM (torch.nn.functional.grouped_mm / torch._grouped_mm)")
    xc, wc, _ = _prepare(x, weight, None)
    mat_b = wc if transposed else wc.transpose(1, 2)  # [G, K, N]
    offs = offsets if offsets.dtype == torch.int32 else offsets.to(torch.int32)
    return _add_bias(_TORCH_GROUPED_MM(xc, mat_b, offs=offs), bias, offs, groups)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor,
                   bias: torch.Tensor | None = None, *, transposed: bool = False,
                   groups: torch.Tensor | None = None) -> torch.Tensor:
    """Grouped linear (see the module docstring): one grouped GEMM on CUDA in bf16, the reference elsewhere.

    ``groups``: the group index of each row (only read with a bias; computed from ``offsets`` when None)."""
    dtype = autocast_dtype(x.device.type) or weight.dtype
    if _fast_path(x, weight, dtype):
        return grouped_linear_grouped_mm(x, weight, offsets, bias, transposed=transposed, groups=groups)
    return grouped_linear_reference(x, weight, offsets, bias, transposed=transposed, groups=groups)
