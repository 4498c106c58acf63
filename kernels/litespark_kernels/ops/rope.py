"""Rotary position embedding (Su et al. 2021) in transformers' ``rotate_half`` convention.

q, k: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim] as produced by the models' rotary embedding
(Llama-3 rope scaling and other variants are already folded into cos/sin there).
out = x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2]).
"""

from __future__ import annotations

import torch

from .._dispatch import run_triton, use_triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the position embedding; Triton kernel on CUDA, reference elsewhere."""
    if unsqueeze_dim == 1 and use_triton("rope", q, k, cos, sin):
        return run_triton("_rope_triton", "apply_rope_triton", q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin, unsqueeze_dim)
