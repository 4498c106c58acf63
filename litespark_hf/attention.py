"""The `litespark` attention backend for transformers' attention registry.

Importing `litespark_hf` registers two functions under the name ``litespark``:
- in ``AttentionInterface``: `litespark_attention_forward`, which runs `litespark_kernels.attention`;
- in ``AttentionMaskInterface``: `litespark_mask`. Both are needed: for a backend with no mask function,
  transformers passes ``attention_mask=None`` and the causal mask is silently dropped.

The kernel does causality, sliding windows, padding and packed documents itself, so for training-shaped calls the
mask function hands back only the 2D padding mask (or None), and the attention function turns it, or packed
``position_ids`` / ``cu_seq_lens_q``, into per-token segment ids. Calls with a KV cache (generation) get transformers'
own 4D boolean mask and go through SDPA.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import litespark_kernels as lk
from litespark_kernels.ops.attention import (
    segment_ids_from_cu_seqlens,
    segment_ids_from_padding_mask,
    segment_ids_from_position_ids,
)

from .unpadding import marked_segments

ATTENTION_NAME = "litespark"


def litespark_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
):
    """Mask function: 2D padding mask (or None) for training-shaped calls; transformers' 4D mask with a KV cache."""
    with_cache = kv_length != q_length or (isinstance(q_offset, int) and q_offset != 0) or kv_offset != 0
    if with_cache:
        kwargs.pop("allow_is_causal_skip", None)
        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
            attention_mask=attention_mask, allow_is_causal_skip=False, **kwargs,
        )
    if attention_mask is None:
        return None
    if not torch.compiler.is_compiling() and bool(attention_mask.all()):  # no padding: no mask (host sync, eager only)
        return None
    return attention_mask


class _OwnPositions:
    """``position_ids`` that Litespark made itself, so known to hold no packed documents without looking at them.

    When the caller passes no ``position_ids`` (the Trainer's usual batch: ``input_ids``, ``labels``, maybe an
    ``attention_mask``), transformers' model makes ``arange(seq)`` and then asks whether that tensor holds packed
    documents: ``find_packed_sequence_indices`` in the mask creation, and this backend's own segment detection,
    each read a device value on the host. Those two waits drain the GPU's queue at the start of every forward, so
    the host can never run ahead of the GPU across steps. `position_pre_hook` (on the patched decoder stack) makes
    the same ``arange`` instead and remembers it here; both checks then answer "not packed" for it (and its views)
    without a sync. Anything else (packed ``position_ids`` from a padding-free collator) is checked as before."""

    def __init__(self) -> None:
        self._ref = None
        self._version = -1

    @staticmethod
    def _root(t: torch.Tensor) -> torch.Tensor:
        return t._base if t._base is not None else t

    def mark(self, positions: torch.Tensor) -> None:
        root = self._root(positions)
        self._ref, self._version = weakref.ref(root), root._version

    def holds(self, t) -> bool:
        """``t`` is the marked tensor or a view of it (``expand``), unchanged since it was made."""
        own = self._ref() if self._ref is not None else None
        if own is None or not isinstance(t, torch.Tensor):
            return False
        return self._root(t) is own and own._version == self._version


_own_positions = _OwnPositions()


def position_pre_hook(module, args, kwargs):
    """Forward pre-hook for the decoder stack: supply ``position_ids = arange(seq)[None]`` when the caller gave
    none and no cache or packing arguments (exactly what the model would make), marked as not packed."""
    if torch.compiler.is_compiling() or kwargs.get("position_ids") is not None or len(args) > 2:
        return None
    if any(kwargs.get(k) is not None for k in ("past_key_values", "cache_position", "cu_seq_lens_q",
                                                 "cu_seq_lens_k", "seq_idx")):
        return None
    ref = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ref, torch.Tensor):
        ref = kwargs.get("inputs_embeds")
        if not isinstance(ref, torch.Tensor) or ref.dim() != 3:
            return None
    elif ref.dim() != 2:
        return None
    positions = torch.arange(ref.shape[1], device=ref.device)[None]
    _own_positions.mark(positions)
    return args, {**kwargs, "position_ids": positions}


def _install_packed_check_skip() -> None:
    """Make transformers' packed-sequence detection answer None, without a host sync, for `_OwnPositions`."""
    import transformers.masking_utils as mu

    original = getattr(mu, "find_packed_sequence_indices", None)
    if original is None or getattr(original, "_litespark_wrapped", False):
        return

    @functools.wraps(original)
    def find_packed_sequence_indices(position_ids, *args, **kwargs):
        if not torch.compiler.is_compiling() and (_own_positions.holds(position_ids)
                                                  or marked_segments(position_ids) is not None):
            return None
        return original(position_ids, *args, **kwargs)

    find_packed_sequence_indices._litespark_wrapped = True
    mu.find_packed_sequence_indices = find_packed_sequence_indices


class _SegmentMemo:
    """Packed-document segment ids computed once per forward (all layers share the same position_ids tensor)."""

    def __init__(self) -> None:
        self._ref = None
        self._version = -1
        self._value = None

    def get(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        marked = marked_segments(position_ids)
        if marked is not None:  # a padded batch packed by litespark_hf.unpadding: its rows are the documents
            return marked
        if torch.compiler.is_compiling():  # no host sync under torch.compile: always pass the segment ids
            return segment_ids_from_position_ids(position_ids)
        if self._ref is not None and self._ref() is position_ids and self._version == position_ids._version:
            return self._value
        if _own_positions.holds(position_ids):  # made by position_pre_hook: one document per row, no sync
            return None
        segments = segment_ids_from_position_ids(position_ids)
        # One host sync per forward, as transformers' own packed-sequence detection does.
        value = None if bool((segments[:, -1] == 0).all()) else segments
        self._ref, self._version, self._value = weakref.ref(position_ids), position_ids._version, value
        return value


_memo = _SegmentMemo()


def _segments(query, key, attention_mask, kwargs):
    """(q_segment_ids, kv_segment_ids) for the kernel, or (None, None) when every token sees its whole prefix."""
    batch, q_len, kv_len = query.shape[0], query.shape[2], key.shape[2]
    if attention_mask is not None:  # 2D padding mask over the keys
        kv = segment_ids_from_padding_mask(attention_mask[:, -kv_len:])
        return kv[:, -q_len:], kv
    position_ids = kwargs.get("position_ids")
    if position_ids is not None and q_len == kv_len and position_ids.shape[-1] == q_len:
        segments = _memo.get(position_ids)
        if segments is not None:
            segments = segments.expand(batch, -1)
            return segments, segments
        return None, None
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is not None and batch == 1 and q_len == kv_len:
        segments = segment_ids_from_cu_seqlens(cu_seqlens, q_len)
        return segments, segments
    return None, None


def litespark_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: q [B,Hq,S,D], k/v [B,Hkv,S,D] -> ([B,S,Hq,D], None)."""
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if attention_mask is not None and attention_mask.dim() == 4:
        # transformers' own mask (KV cache, or a custom 4D mask from the user): SDPA with that mask.
        mask = attention_mask
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=False, enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    q_seg, kv_seg = _segments(query, key, attention_mask, kwargs)
    out = lk.attention(
        query, key, value, scale=scaling, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        sliding_window=sliding_window, dropout_p=dropout,
    )
    return out, None


def register() -> None:
    """Register the backend and its mask function (idempotent; done at `import litespark_hf`)."""
    AttentionInterface.register(ATTENTION_NAME, litespark_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, litespark_mask)
    _install_packed_check_skip()


def is_registered() -> bool:
    return (
        AttentionInterface._global_mapping.get(ATTENTION_NAME) is litespark_attention_forward
        and AttentionMaskInterface._global_mapping.get(ATTENTION_NAME) is litespark_mask
    )
