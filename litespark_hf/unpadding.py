"""Padded batches at packed cost: the decoder stack runs on the real tokens only.

TRL's default SFT/DPO batches are padded to the longest row, and with long-tailed chat data most of a batch can be
padding: every token-wise op (projections, norms, MLP, RoPE) would run on pad tokens that no loss reads. When a
padded batch reaches a Litespark decoder stack (``model.model``), `unpad_pre_hook` gathers the real tokens into one
packed row ``[1, T]`` (each original row one document: ``position_ids`` are the positions stock would use, the
caller's or ``arange(seq)`` per row, so left padding gives the same RoPE angles as stock), and `repad_post_hook`
scatters the stack's output back to ``[batch, seq, hidden]`` (zeros at the pads), so callers - the model's own LM head
and loss, TRL's fused LM head, a user's code - see the shapes they expect. Attention gets the document of each token
as segment ids (`mark_segments`), so no token attends across rows, exactly like the padding mask.

What is the same as stock: every real token's output (the ops are token-wise except attention, which sees the same
keys); the loss, since pad labels are ignored. What differs: the hidden states AT pad positions are zero instead of
the values stock computes for pad tokens, and so a label right after a pad (a left-padded row's first real token,
which stock "predicts" from the pad's hidden state) is ignored (`label_pre_hook`). It is used only for calls that carry no KV cache
(training, and forwards with ``use_cache=False`` such as TRL's fused LM head, DPO's reference pass included), do not
ask for per-layer hidden states or attentions, and only when the batch has padding. Finding the real tokens needs
their number on the host: a device read (``nonzero``) at the start of the forward, which makes the host wait for the
whole previous step (backward and optimizer) before it can launch the first layer, unless the number is already known
there. The trainers of `litespark_hf` know it: `TokenCountingCollator` counts each batch's mask on the CPU, where the
collator made it, and the trainer hands that count over with the batch's mask (`note_token_count`); the gather is
then ``nonzero_static`` of that size, with no wait.

Only on CUDA by default: without the attention kernel (CPU), the PyTorch reference attends over the whole packed row
with a mask, which costs (rows x seq)^2 instead of rows x seq^2; ``LITESPARK_UNPAD_CPU=1`` unpads there too (the
tests do, to check the path the GPU takes). The label rule of `label_pre_hook` applies everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn as nn

from ._tensor_memo import TensorMemo

_STATE = "_litespark_unpad"
# The batch key under which `TokenCountingCollator` passes the host's count of real tokens (taken out of the batch by
# the trainer, `pop_token_count`, before any model sees it).
TOKEN_COUNT_KEY = "litespark_real_tokens"


class TokenCountingCollator:
    """Wraps a data collator: each batch with a 2-D CPU ``attention_mask`` also carries the number of its real tokens
    as a Python int under `TOKEN_COUNT_KEY` (counted where the mask is made, on the CPU; pinning and the copy to the
    device leave an int as it is). Picklable, for data-loader worker processes."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.device.type == "cpu" \
                and TOKEN_COUNT_KEY not in batch:
            batch[TOKEN_COUNT_KEY] = int(mask.count_nonzero())
        return batch

    def __getattr__(self, name):  # the wrapped collator's attributes (tokenizer, padding side, ...)
        if name == "collator":
            raise AttributeError(name)
        return getattr(self.collator, name)


# The host's count of real tokens for one attention-mask tensor (the current batch's), held while that very tensor is
# unchanged (same object, same version counter).
_known = TensorMemo()


def note_token_count(mask: torch.Tensor, count: int) -> None:
    """Tell the unpadding that ``mask`` (as it is now) has ``count`` nonzero entries, so it need not read the device."""
    _known.put(mask, int(count))


def pop_token_count(inputs) -> None:
    """Take `TOKEN_COUNT_KEY` out of a batch (a dict) and note it for the batch's ``attention_mask``."""
    if not isinstance(inputs, dict):
        return
    count = inputs.pop(TOKEN_COUNT_KEY, None)
    mask = inputs.get("attention_mask")
    if isinstance(count, int) and isinstance(mask, torch.Tensor) and mask.dim() == 2 and 0 <= count <= mask.numel():
        note_token_count(mask, count)


def _real_token_indices(mask: torch.Tensor) -> torch.Tensor | None:
    """Flat indices of the real tokens, or None when there is no padding: ``nonzero_static`` when the host knows their
    number (no device read; nothing at all launched for a batch without padding), ``nonzero`` (one host sync)
    otherwise."""
    count = _known.get(mask)
    if count == mask.numel():
        return None
    keep = mask.reshape(-1) != 0
    idx = keep.nonzero() if count is None else torch.nonzero_static(keep, size=count)
    idx = idx.squeeze(1)
    return None if idx.numel() == mask.numel() else idx


def mark_segments(position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """Attach the document index of each token to ``position_ids`` (read by the ``litespark`` backend and by the
    packed-sequence check, which then need not look at the positions)."""
    position_ids._litespark_segments = segment_ids
    return position_ids


def marked_segments(position_ids) -> torch.Tensor | None:
    """The segment ids `mark_segments` attached to this very tensor, or None."""
    return getattr(position_ids, "_litespark_segments", None) if isinstance(position_ids, torch.Tensor) else None


def _wants_unpad(module: nn.Module, args, kwargs) -> bool:
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or len(args) > 1 or torch.compiler.is_compiling():
        return False
    if mask.device.type != "cuda" and os.environ.get("LITESPARK_UNPAD_CPU") != "1":
        return False  # the attention reference (no kernel) would pay (rows x seq)^2 on the packed row
    if kwargs.get("past_key_values") is not None or kwargs.get("cache_position") is not None:
        return False
    use_cache = kwargs.get("use_cache")
    if use_cache or (use_cache is None and not module.training):
        return False  # generation, or an eval forward that may build a cache for its caller
    if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
        return False
    keeps = getattr(module, "litespark_keeps_padding", None)  # a family whose masks are not causal (Gemma3 images)
    if keeps is not None and keeps(kwargs):
        return False
    if any(kwargs.get(k) is not None for k in ("cu_seq_lens_q", "cu_seq_lens_k", "seq_idx")):
        return False
    ref = args[0] if args else kwargs.get("input_ids")
    if ref is None:
        ref = kwargs.get("inputs_embeds")
        return isinstance(ref, torch.Tensor) and ref.dim() == 3 and ref.shape[:2] == mask.shape
    return isinstance(ref, torch.Tensor) and ref.dim() == 2 and ref.shape == mask.shape


def unpad_pre_hook(module: nn.Module, args, kwargs):
    """Forward pre-hook (with kwargs) for the decoder stack: a padded batch becomes one packed row of real tokens.

    Never under torch.compile (the unpadding needs a host sync), where it touches no state either: ``__dict__.pop``
    is a graph break for torch 2.11's Dynamo. A state left by an eager forward that raised is popped by the next
    eager call, and never read by a compiled one (`repad_post_hook`)."""
    if torch.compiler.is_compiling():
        return None
    module.__dict__.pop(_STATE, None)
    if not _wants_unpad(module, args, kwargs):
        return None
    mask = kwargs["attention_mask"]
    batch, seq = mask.shape
    idx = _real_token_indices(mask)  # a host sync unless the trainer gave the count
    kwargs = dict(kwargs)
    if idx is None:  # no padding: nothing to gather, and no mask to check again downstream
        kwargs["attention_mask"] = None
        return args, kwargs
    if idx.numel() == 0:
        return None
    positions = kwargs.get("position_ids")
    if positions is None or positions.shape[0] == 1:  # one row of positions for every row (the default arange)
        cols = idx % seq
        positions = cols[None] if positions is None else positions[0].index_select(0, cols)[None]
    else:
        positions = positions.reshape(-1).index_select(0, idx)[None]
    mark_segments(positions, (idx // seq).to(torch.int32)[None])  # each original row is one document
    if args:
        kwargs["input_ids"], args = args[0], ()
    if kwargs.get("input_ids") is not None:
        kwargs["input_ids"] = kwargs["input_ids"].reshape(-1).index_select(0, idx)[None]
    else:
        embeds = kwargs["inputs_embeds"]
        kwargs["inputs_embeds"] = embeds.reshape(batch * seq, -1).index_select(0, idx)[None]
    kwargs.update(attention_mask=None, position_ids=positions, use_cache=False)
    module.__dict__[_STATE] = (idx, batch, seq)
    return args, kwargs


def repad_post_hook(module: nn.Module, args, kwargs, output):
    """Forward hook (with kwargs) for the decoder stack: the packed output back in the caller's padded layout."""
    if torch.compiler.is_compiling():  # the pre-hook unpads nothing there
        return None
    state = module.__dict__.pop(_STATE, None)
    if state is None:
        return None
    idx, batch, seq = state
    packed = output.last_hidden_state[0]
    full = packed.new_zeros(batch * seq, packed.shape[-1]).index_copy(0, idx, packed)
    output.last_hidden_state = full.view(batch, seq, -1)
    return output


def label_pre_hook(module: nn.Module, args, kwargs):
    """Forward pre-hook (with kwargs) for the causal LM: a pad token predicts nothing.

    With left padding, the label of a row's first real token would be "predicted" from the pad before it: stock
    computes that term from the pad token's hidden state, which the unpadded stack no longer computes (it is zero).
    Such labels become ``-100`` (collators that pad on the left for training, and TRL's, mask them already). No sync.
    """
    labels, mask = kwargs.get("labels"), kwargs.get("attention_mask")
    if not isinstance(labels, torch.Tensor) or not isinstance(mask, torch.Tensor) or mask.dim() != 2 \
            or labels.shape != mask.shape or kwargs.get("shift_labels") is not None:
        return None
    after_pad = torch.zeros_like(labels, dtype=torch.bool)
    after_pad[:, 1:] = mask[:, :-1] == 0
    return args, {**kwargs, "labels": labels.masked_fill(after_pad, -100)}


def install(stack: nn.Module, causal_lm: nn.Module | None = None) -> list:
    """Register the hooks on the decoder stack (and the label hook on the causal LM around it); returns the
    handles."""
    handles = [stack.register_forward_pre_hook(unpad_pre_hook, with_kwargs=True),
               stack.register_forward_hook(repad_post_hook, with_kwargs=True)]
    if causal_lm is not None and causal_lm is not stack:
        handles.append(causal_lm.register_forward_pre_hook(label_pre_hook, with_kwargs=True))
    return handles
