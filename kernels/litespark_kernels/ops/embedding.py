"""Embedding lookup whose weight gradient is added into the tied LM head's gradient in place.

With tied input/output embeddings (Llama-3.2-1B/3B, small Qwen2/Qwen3) the weight gets two gradients per step: the
LM head's (a dense ``vocab x hidden`` matrix, from the fused cross-entropy) and the embedding's (``tokens`` rows).
Stock autograd builds the embedding's as a second dense matrix (zero-filled, then scattered) and adds the two:
three full passes over ``vocab x hidden`` fp32 (1 GB for a 128k vocabulary), ~1.5 ms per step on an H100.

`tied_embedding` instead takes a `TiedGrad` that the fused loss fills with its weight gradient; the lookup's
backward (which autograd runs after the loss's, the lookup being earlier in the forward) adds its rows into that
tensor with ``index_put_(accumulate=True)`` and returns no gradient of its own, so the weight's gradient is the same
sum without the dense copy. When the loss did not hand over a gradient (another loss, or its reference path), the
backward returns the stock dense gradient (``embedding_dense_backward``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TiedGrad:
    """One forward's hand-over slot: the fused loss puts its weight gradient in ``grad`` (if the lookup ran,
    ``used``); the lookup's backward adds its rows into it and clears the slot."""

    __slots__ = ("grad", "used")

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None
        self.used = False

    def offer(self, grad: torch.Tensor | None, weight: torch.Tensor) -> None:
        """From the loss: its gradient of ``weight`` (kept only if the lookup ran and it fits)."""
        if self.used and grad is not None and grad.shape == weight.shape and grad.dtype == weight.dtype \
                and grad.device == weight.device and grad.is_contiguous():
            self.grad = grad


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, padding_idx, slot):
        ctx.save_for_backward(ids)
        ctx.meta = (weight.shape[0], padding_idx, slot)
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        num_weights, padding_idx, slot = ctx.meta
        target, slot.grad = slot.grad, None  # drop the extra reference: autograd may then keep the tensor as .grad
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        flat = ids.reshape(-1)
        rows = grad.reshape(-1, grad.shape[-1])
        if target is not None and rows.dtype == target.dtype:
            if padding_idx is not None:  # the padding row gets no gradient (masked, not selected: no host sync)
                rows = rows * (flat != padding_idx).unsqueeze(1).to(rows.dtype)
            target.index_put_((flat,), rows, accumulate=True)
            return None, None, None, None
        pad = padding_idx if padding_idx is not None else -1
        return None, torch.ops.aten.embedding_dense_backward(grad, ids, num_weights, pad, False), None, None


def tied_embedding(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, slot: TiedGrad) -> torch.Tensor:
    """``F.embedding(ids, weight, padding_idx)`` whose weight gradient goes into ``slot``'s tensor when the fused
    loss filled it (see the module docstring); ``max_norm`` / ``scale_grad_by_freq`` / sparse are not handled."""
    slot.used = True
    return _TiedEmbedding.apply(ids, weight, padding_idx, slot)
