"""Structured channel skipping for MLPs (Sparsity-Accelerated Training, Ma et al. 2024, arXiv 2406.01392).

Only the selected intermediate channels ``index`` (a sorted 1-D int64 tensor of ``k`` channel ids) are computed:

- gated MLP (Llama, Mistral, Qwen2, Qwen3): ``down[:, idx](act(gate[idx] x) * up[idx] x)``
- plain MLP (StarCoder2): ``proj[:, idx](act(fc[idx] x + b_fc[idx])) + b_proj``

The weights are gathered (``index_select``: rows of gate/up/fc, columns of down/proj: a copy of ``k * hidden``
elements) and the products are ordinary dense GEMMs of size ``[tokens, hidden] x [hidden, k]`` and
``[tokens, k] x [k, hidden]``: forward and backward do ``k / intermediate`` of the dense MLP's matmul work, and no
full-size masked matmul runs. The gather's backward scatters the gradients of the gathered slices back,
so the full weights' gradients are exactly zero on the omitted rows/columns.

Fast path = this torch path (cuBLAS GEMMs on the gathered weights, fused SwiGLU/GeGLU from
`litespark_kernels.activations`). The gather is `gather_weight`: ``index_select`` then a cast of the gathered slice to the
compute dtype (under autocast the fp32 master weight's kept part is cast once; autocast then casts nothing more), and its backward writes
the kept slices into a zero-filled full-size gradient with ``index_copy_`` (no atomics, no second fp32 copy). A
Triton GEMM that reads the rows in place would only save the gather copy (``3 * k * hidden`` elements per layer,
small beside the GEMMs), so none is written.

``*_reference`` functions are the specification and test oracle: the dense MLP with the omitted channels' activations
zeroed (same result; gradients of omitted rows are then zero too, since nothing downstream depends on them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .activations import geglu, gelu_tanh_bias, swiglu

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


def mean_abs_per_channel(h: torch.Tensor) -> torch.Tensor:
    """``mean(|h|)`` over all leading dims, in float32, without a float32 copy of ``h`` (importance metric)."""
    flat = h.detach().reshape(-1, h.shape[-1])
    return torch.linalg.vector_norm(flat, ord=1, dim=0, dtype=torch.float32) / max(flat.shape[0], 1)
