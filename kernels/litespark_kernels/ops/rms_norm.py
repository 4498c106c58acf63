"""RMSNorm (Zhang & Sennrich 2019): y = w * x / sqrt(mean(x^2) + eps), statistics in fp32.

Matches transformers' LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then multiply by the weight.
``add_rms_norm`` fuses the residual add that precedes a norm in pre-norm decoders: s = x + residual; (rms_norm(s), s).

``offset`` (a float; None by default) selects Gemma's RMSNorm instead (Gemma, Gemma2, Gemma3, whose weight is stored
minus one and initialised to 0): y = x_hat * (offset + weight) with the whole product in fp32 (weight upcast), rounded
once to the input dtype: ``(norm(x.float()) * (1.0 + weight.float())).type_as(x)``.
"""

from __future__ import annotations

import torch

from .._dispatch import run_triton, use_triton


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       offset: float | None = None) -> torch.Tensor:
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    if offset is not None:  # Gemma: (x_hat * (offset + w)) in fp32, rounded once to the input dtype
        return (h * (offset + weight.float())).to(input_dtype)
    return weight * h.to(input_dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    s = x + residual
    return rms_norm_reference(s, weight, eps, offset), s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             out_dtype: torch.dtype | None = None, offset: float | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension; Triton kernel on CUDA, reference elsewhere.

    ``out_dtype``: the result rounded once to this dtype (e.g. bf16 when every consumer would cast it to bf16 under
    autocast anyway: same values, half the bytes, no separate cast); default promote(weight, x) as transformers
    (with ``offset``: x.dtype, as Gemma's ``type_as(x)``).
    ``offset``: Gemma's RMSNorm, ``x_hat * (offset + weight)`` in fp32 (see the module docstring); None: Llama's.
    """
    if use_triton("rms_norm", x, weight):
        return run_triton("_rms_norm_triton", "rms_norm_triton", x, weight, eps, out_dtype, offset)
    y = rms_norm_reference(x, weight, eps, offset)
    return y if out_dtype is None else y.to(out_dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
    out_dtype: torch.dtype | None = None, offset: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add fused with RMSNorm: returns (rms_norm(x + residual), x + residual).

    ``out_dtype`` and ``offset`` as in `rms_norm` (the normalised output only; the sum keeps promote(x, residual))."""
    if use_triton("add_rms_norm", x, residual, weight):
        return run_triton("_rms_norm_triton", "add_rms_norm_triton", x, residual, weight, eps, out_dtype, offset)
    y, s = add_rms_norm_reference(x, residual, weight, eps, offset)
    return (y if out_dtype is None else y.to(out_dtype)), s
