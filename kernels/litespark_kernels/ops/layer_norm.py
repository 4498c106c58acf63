"""LayerNorm with bias (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * w + b, statistics in fp32.

Matches ``torch.nn.functional.layer_norm`` over the last dimension (StarCoder2's norms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import run_triton, use_triton


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm over the last dimension; Triton kernel on CUDA, reference elsewhere."""
    if weight is not None and use_triton("layer_norm", x, weight, bias):
        return run_triton("_layer_norm_triton", "layer_norm_triton", x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)
