"""Float8 projections (``LitesparkConfig.fp8``): `fused_linear`'s GEMMs in float8 with tensorwise dynamic scales.

The recipe (what each GEMM of ``y = x w^T`` runs in; the master weights, the optimizer, the gradients' dtypes and
everything outside the projections are unchanged):

- forward ``y = x w^T``: ``x`` and ``w`` (each in the compute dtype first, as the bf16 path has them) quantized to
  ``float8_e4m3fn``, each with one scale for the whole tensor, ``scale = 448 / amax(|t|)`` (``amax`` of this very
  tensor: dynamic scaling, no history); ``y`` written by the GEMM in the compute dtype;
- backward ``dx = dy w`` and ``dw = dy^T x``: the output gradient ``dy`` quantized to ``float8_e5m2`` (more range,
  fewer mantissa bits: gradients) the same way, ``w`` and ``x`` reused from the forward; ``dx`` written in the
  input's dtype, ``dw`` in the weight's (fp32 for fp32 master weights: straight from the GEMM's accumulator).

The GEMMs are ``torch._scaled_mm`` (cuBLASLt float8 on Hopper/Ada; ATen's on the CPU, which the tests use). It needs
the inner dimensions in multiples of 16 and its second operand column-major, so the quantize step pads the token
dimension to a multiple of 16 (zero rows, which add nothing to ``dw``) and writes the transposed copy the backward
GEMMs read (`quantize`: one pass that writes both). What is saved for the backward is the transposed float8 copy of
``x`` and of ``w`` (1 byte per element, half of what the bf16 path saves).

`quantize_reference` is the specification; `quantize` runs it as two Triton launches on CUDA (the amax, then the
scaled cast writing both layouts) and the reference elsewhere. The tests' oracle of the whole product is the same
quantization, dequantized to float32, multiplied in float32.
"""

from __future__ import annotations

import torch

from .._dispatch import device_supports, run_triton, use_triton

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
AMAX_EPS = 1e-12  # an all-zero tensor gets scale fmax / AMAX_EPS: its quantized values are zero, as they should be
ALIGN = 16  # torch._scaled_mm: inner dimensions in multiples of 16


def padded(n: int, to: int = ALIGN) -> int:
    return -(-n // to) * to


def scale_of(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``fmax(dtype) / max(amax, AMAX_EPS)`` in float32, correctly rounded (the factor a tensor is multiplied by
    before the cast). Not ``fmax / tensor``: torch computes that as ``reciprocal() * fmax``, one more rounding."""
    amax = amax.float().clamp_min(AMAX_EPS)
    return torch.div(amax.new_full((), torch.finfo(dtype).max), amax)


def quantize_reference(t: torch.Tensor, dtype: torch.dtype, pad_rows_to: int = 1, transposed: bool = False):
    """Tensorwise quantization of a 2-D ``t`` [R, C]: ``(q, qt, inv_scale)``.

    ``q`` [R', C] = ``clamp(t * scale, +-fmax)`` cast to ``dtype`` (round to nearest), with R' = R rounded up to a
    multiple of ``pad_rows_to`` (the extra rows zero); ``qt`` = ``q.t().contiguous()`` [C, R'] when ``transposed``
    else None; ``inv_scale`` = ``1 / scale``, a float32 tensor of one element (what `torch._scaled_mm` multiplies
    by). ``scale`` = ``fmax / amax(|t|)`` (`scale_of`)."""
    if t.dim() != 2:
        raise ValueError(f"quantize takes a 2-D tensor, got shape {tuple(t.shape)}")
    fmax = torch.finfo(dtype).max
    amax = torch.linalg.vector_norm(t, ord=float("inf"), dtype=torch.float32)
    scale = scale_of(amax, dtype)
    rows = padded(t.shape[0], pad_rows_to)
    if rows != t.shape[0]:  # zero rows (quantized to zero; the amax is already taken)
        t = torch.nn.functional.pad(t, (0, 0, 0, rows - t.shape[0]))
    q = (t.float() * scale).clamp_(-fmax, fmax).to(dtype)
    qt = q.t().contiguous() if transposed else None
    return q, qt, torch.div(scale.new_ones(()), scale).reshape(1)


def quantize(t: torch.Tensor, dtype: torch.dtype, pad_rows_to: int = 1, transposed: bool = False):
    """`quantize_reference`, as Triton kernels on CUDA (the amax reduction, then one pass writing ``q`` and ``qt``)."""
    if t.dim() == 2 and t.stride(1) == 1 and use_triton("fp8_quantize", t):
        return run_triton("_fp8_triton", "quantize_triton", t, dtype, pad_rows_to, transposed)
    return quantize_reference(t, dtype, pad_rows_to, transposed)


def _scaled_mm_check(device: torch.device) -> bool:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    a = torch.ones(16, 16, device=device).to(E4M3)
    g = torch.ones(16, 16, device=device).to(E5M2)
    one = torch.ones(1, device=device)
    y = torch._scaled_mm(g, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    return bool(y.dtype == torch.float32 and y[0, 0].item() == 16.0)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether this device runs `torch._scaled_mm` on e5m2 x e4m3 operands with a float32 output (CUDA: compute
    capability 8.9 or higher; probed once per device)."""
    return device_supports("scaled_mm_fp8", device, _scaled_mm_check)


def unsupported_reason(x: torch.Tensor, k: int, n_out: int, cdt: torch.dtype) -> str | None:
    """Why a projection [.., k] -> [.., n_out] in ``cdt`` cannot run in float8 here (None: it can)."""
    if cdt not in (torch.bfloat16, torch.float16):
        return f"the compute dtype is {cdt} (float8 needs bf16/fp16 autocast or weights)"
    if k % ALIGN or n_out % ALIGN:
        return f"a projection of {k} -> {n_out} features (float8 GEMMs need multiples of {ALIGN})"
    if not scaled_mm_supported(x.device):
        return f"{x.device} has no float8 GEMM (torch._scaled_mm; CUDA needs compute capability 8.9+)"
    return None


def scaled_mm(a: torch.Tensor, b_t: torch.Tensor, inv_a: torch.Tensor, inv_b: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(a * inv_a) @ (b_t * inv_b).t()`` for row-major float8 ``a`` [M, K] and ``b_t`` [N, K] (read as the
    column-major ``b_t.t()``), written in ``out_dtype``. ``fast_accum``: Hopper's faster float8 accumulation (the
    forward GEMM uses it; the gradients' GEMMs keep the precise one, as torchao's float8 recipes do)."""
    return torch._scaled_mm(a, b_t.t(), scale_a=inv_a, scale_b=inv_b, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


__all__ = ["ALIGN", "E4M3", "E5M2", "padded", "quantize", "quantize_reference",
           "scale_of", "scaled_mm", "scaled_mm_supported", "unsupported_reason"]
