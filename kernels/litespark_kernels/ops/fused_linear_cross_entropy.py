"""Linear layer + cross-entropy without materialising the full [tokens, vocab] logits.

Specification (``fused_linear_cross_entropy_reference``): transformers' ``ForCausalLMLoss`` applied to
``hidden @ weight.T (+ bias)``:
    logits are upcast to fp32; unless ``shift_labels`` is given, labels are shifted left by one (the last position
    gets ``ignore_index``); cross-entropy ignores ``ignore_index``; the mean is over non-ignored tokens, or, when
    ``num_items_in_batch`` is given (gradient accumulation), the sum divided by ``num_items_in_batch``.

``softcap`` (Gemma2/Gemma3's ``final_logit_softcapping``): the logits are first replaced by
``softcap * tanh(logits / softcap)``, in the order and dtype of transformers' ``Gemma2ForCausalLM.forward``
(divide, tanh, multiply, on the LM head's output dtype), before the fp32 upcast of the loss. A logit scaling
(Granite's ``logits / logits_scaling``) is the caller's: it passes ``hidden / logits_scaling`` (the head has no
bias), so a cap would apply to the scaled logits, as it would in transformers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import run_triton, use_triton


def shifted_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels of the next token at every position (transformers' causal-LM shift)."""
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:].contiguous()


class LabelCount:
    """How many labels are not ``ignore_index``, started on the device when the labels arrive.

    The fused loss must know, on the host, how many rows it keeps. Counting at the loss would wait for the whole
    forward pass queued before it (a host sync that leaves the GPU idle while the backward is launched); made before
    the decoder runs, the count is copied to pinned host memory behind a CUDA event that has completed by the time
    the loss reads it. On CPU tensors it is counted at once.
    """

    def __init__(self, shift_labels: torch.Tensor, ignore_index: int = -100):
        self.valid = shift_labels != ignore_index
        self._event = None
        count = self.valid.sum()
        if count.is_cuda:
            self._host = torch.empty((), dtype=count.dtype, pin_memory=True)
            self._host.copy_(count, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = count

    def value(self) -> int:
        if self._event is not None:
            self._event.synchronize()
        return int(self._host)


def count_labels(shift_labels: torch.Tensor, ignore_index: int = -100) -> LabelCount:
    """Start counting the kept labels (see `LabelCount`); pass the result as ``label_count=`` with these labels."""
    return LabelCount(shift_labels, ignore_index)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    if shift_labels is None:
        if labels is None:
            raise ValueError("give labels or shift_labels")
        shift_labels = shifted_labels(labels, ignore_index)
    logits = F.linear(hidden, weight, bias)
    if softcap is not None:  # transformers' Gemma2ForCausalLM, op for op
        logits = logits / softcap
        logits = torch.tanh(logits)
        logits = logits * softcap
    logits = logits.float()
    logits = logits.reshape(-1, logits.shape[-1])
    target = shift_labels.reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="mean")
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: torch.Tensor | int | None = None,
    label_count: LabelCount | None = None,
    tied_grad=None,
    weight_cast: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Same loss and gradients as the reference; chunked Triton path on CUDA, reference elsewhere.

    ``label_count``: optional `count_labels(shift_labels)` of the same (shifted) labels, made early so that the
    Triton path needs no host sync. ``tied_grad``: the `TiedGrad` of a `tied_embedding` lookup of this same
    ``weight`` in this forward; the Triton path hands it the weight gradient (see `litespark_kernels.embedding`).
    ``weight_cast``: ``weight`` already in the compute dtype (e.g. a `CastShadow` view), used by the Triton path
    instead of casting it; ignored unless its dtype and shape fit. ``softcap``: final-logit soft-capping
    ``softcap * tanh(logits / softcap)`` (see the module docstring); the Triton path applies it in fp32 to each
    chunk's logits and multiplies their gradient by ``1 - tanh(logits / softcap)^2``.
    """
    if use_triton("fused_linear_cross_entropy", hidden, weight):
        return run_triton(
            "_fused_linear_cross_entropy_triton", "fused_linear_cross_entropy_triton",
            hidden, weight, labels, bias=bias, shift_labels=shift_labels, ignore_index=ignore_index,
            num_items_in_batch=num_items_in_batch, label_count=label_count, tied_grad=tied_grad,
            weight_cast=weight_cast, softcap=softcap,
        )
    return fused_linear_cross_entropy_reference(
        hidden, weight, labels, bias=bias, shift_labels=shift_labels, ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch, softcap=softcap,
    )
