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

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

import litespark_kernels as lk
from litespark_kernels._dispatch import warn_once
from litespark_kernels.ops.attention import (
    effective_window,
    segment_ids_from_cu_seqlens,
    segment_ids_from_padding_mask,
    segment_ids_from_position_ids,
    visibility_mask,
)

from ._tensor_memo import TensorMemo
from .unpadding import mark_segments, marked_segments

ATTENTION_NAME = "litespark"


class UnsupportedAttentionFeatureError(ValueError):
    """A model passed the ``litespark`` attention function an argument it does not implement (it would otherwise be
    ignored, giving silently wrong attention)."""


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
    if _needs_exact_mask(kwargs):
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


def _needs_exact_mask(kwargs) -> bool:
    """Whether this mask holds something the attention function cannot rebuild from the call's arguments, so
    transformers' own 4D mask is needed (then applied through SDPA or `_reference_attention`).

    The fast path (a 2D padding mask or None) leaves causality to the module's ``is_causal``, sliding windows to the
    ``sliding_window`` argument and packing to ``position_ids``. That holds for the architectures of the table (their
    attention modules pass their window). A model outside it may build a sliding-window or chunked mask without
    passing the window to its attention function (Qwen2-MoE, PhiMoE, Llama4's chunks), or extend the mask with its own
    ``or_mask_function``/``and_mask_function`` (Gemma3's bidirectional image tokens; ``use_vmap`` is set exactly then):
    for those, every mask that is not plain causal is built by transformers."""
    if kwargs.get("use_vmap"):
        return True
    mask_function = kwargs.get("mask_function")
    if mask_function is None or mask_function is causal_mask_function:
        return False
    config = kwargs.get("config")
    model_type = getattr(config, "model_type", None)
    if model_type in _table_types():
        return False
    warn_once("attention", f"the attention mask of {model_type!r} (outside the architecture table) is not plain "
                           "causal: transformers' own 4D mask is used, through SDPA")
    return True


@functools.lru_cache(maxsize=1)
def _table_types() -> frozenset:
    from .architectures import SUPPORTED_MODEL_TYPES

    return frozenset(SUPPORTED_MODEL_TYPES)


def partial_attention_problem(hf_config) -> str | None:
    """Why the ``litespark`` backend alone cannot stand in for this model's attention (`apply` with
    ``allow_partial=True`` refuses), or None. Features that reach the attention function as arguments are checked
    there, per call (`litespark_attention_forward`); this catches the ones configured outside it."""
    configs = [hf_config]
    text = getattr(hf_config, "get_text_config", None)
    if callable(text) and text() is not hf_config:
        configs.append(text())
    for cfg in configs:
        attn_config = getattr(cfg, "attn_config", None)  # MPT keeps its attention options in a sub-config
        nested = attn_config.get("alibi") if isinstance(attn_config, dict) else getattr(attn_config, "alibi", None)
        if getattr(cfg, "alibi", False) or getattr(cfg, "use_alibi", False) or nested \
                or getattr(cfg, "position_embedding_type", None) == "alibi":
            return ("its config enables ALiBi position biases, which are added to the attention scores outside the "
                    "attention function's arguments; the litespark backend does not implement them.")
    return None


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
        self._memo = TensorMemo()

    @staticmethod
    def _root(t: torch.Tensor) -> torch.Tensor:
        return t._base if t._base is not None else t

    def mark(self, positions: torch.Tensor) -> None:
        self._memo.put(self._root(positions))

    def holds(self, t) -> bool:
        """``t`` is the marked tensor or a view of it (``expand``), unchanged since it was made."""
        return isinstance(t, torch.Tensor) and self._memo.holds(self._root(t))


_own_positions = _OwnPositions()


def position_pre_hook(module, args, kwargs):
    """Forward pre-hook for the decoder stack: supply ``position_ids = arange(seq)[None]`` when the caller gave
    none and no cache or packing arguments (exactly what the model would make), marked as not packed; and for a
    padding-free batch that carries ``cu_seq_lens_q`` (`_packed_from_cu_seqlens`), take its documents from there."""
    if torch.compiler.is_compiling() or len(args) > 2:
        return None
    if kwargs.get("position_ids") is not None:
        packed = _packed_from_cu_seqlens(kwargs)
        return None if packed is None else (args, packed)
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


def _packed_from_cu_seqlens(kwargs):
    """A padding-free batch (TRL's ``padding_free=True``, transformers' ``DataCollatorWithFlattening``) arrives as one
    row with ``position_ids`` and the document boundaries ``cu_seq_lens_q``. Finding the documents from the positions
    reads a device value on the host, twice (transformers' ``find_packed_sequence_indices`` in the mask creation and
    this backend's segment detection), at the start of the forward: the host then waits for everything queued (the
    previous step's backward and optimizer) before it can launch the first layer. The boundaries give the same
    documents without a read (``searchsorted``): they are attached to a view of ``position_ids`` (`mark_segments`,
    never the caller's tensor), which both checks then take as known. Where the two disagree the boundaries win, as
    in transformers' flash-attention path. Returns the new keyword arguments, or None (nothing changed)."""
    positions, cu = kwargs.get("position_ids"), kwargs.get("cu_seq_lens_q")
    if not isinstance(positions, torch.Tensor) or not isinstance(cu, torch.Tensor) or positions.dim() != 2 \
            or positions.shape[0] != 1 or cu.dim() != 1 or cu.numel() < 2 or marked_segments(positions) is not None:
        return None
    if kwargs.get("past_key_values") is not None or kwargs.get("cache_position") is not None:
        return None
    k = kwargs.get("cu_seq_lens_k")
    if isinstance(k, torch.Tensor) and k is not cu and k.shape != cu.shape:  # queries and keys split differently
        return None
    marked = positions.view(positions.shape)
    mark_segments(marked, segment_ids_from_cu_seqlens(cu.to(positions.device), positions.shape[1]))
    return {**kwargs, "position_ids": marked}


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
        self._memo = TensorMemo()

    def get(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        marked = marked_segments(position_ids)
        if marked is not None:  # a padded batch packed by litespark_hf.unpadding: its rows are the documents
            return marked
        if torch.compiler.is_compiling():  # no host sync under torch.compile: always pass the segment ids
            return segment_ids_from_position_ids(position_ids)
        if self._memo.holds(position_ids):
            return self._memo.value
        if _own_positions.holds(position_ids):  # made by position_pre_hook: one document per row, no sync
            return None
        segments = segment_ids_from_position_ids(position_ids)
        # One host sync per forward, as transformers' own packed-sequence detection does.
        value = None if bool((segments[:, -1] == 0).all()) else segments
        self._memo.put(position_ids, value)
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
    if cu_seqlens is not None:
        if batch != 1 or q_len != kv_len:
            raise UnsupportedAttentionFeatureError(
                f"the litespark attention backend takes cu_seq_lens_q (packed documents) for one flattened row "
                f"without a KV cache; got batch {batch}, {q_len} queries, {kv_len} keys. Pass position_ids too."
            )
        segments = segment_ids_from_cu_seqlens(cu_seqlens, q_len)
        return segments, segments
    seq_idx = kwargs.get("seq_idx")  # DataCollatorWithFlattening(return_seq_idx=True): document index per token
    if seq_idx is not None:
        if q_len != kv_len or seq_idx.shape[-1] != q_len:
            raise UnsupportedAttentionFeatureError(
                f"the litespark attention backend takes seq_idx (packed documents) of the query length without a KV "
                f"cache; got seq_idx {tuple(seq_idx.shape)}, {q_len} queries, {kv_len} keys. Pass position_ids too."
            )
        segments = seq_idx.to(torch.int32).expand(batch, -1)
        return segments, segments
    return None, None


# Keyword arguments the attention function understands. Applied: ``dropout``, ``scaling``, ``sliding_window``,
# ``is_causal``, packing (``position_ids``, ``cu_seq_lens_q``, ``seq_idx``), ``softcap`` (Gemma2-style logit
# soft-capping: in the kernel; through `_reference_attention` with sinks or a 4D mask) and ``s_aux`` (GPT-OSS
# attention sinks, through `_reference_attention`).
_HANDLED_KWARGS = frozenset({"position_ids", "cu_seq_lens_q", "seq_idx", "softcap", "s_aux"})
# Arguments that flow from the model's forward into every attention call and do not change the attention itself:
# the other flash-attention packing descriptors (implied by the ones above), cache/output switches (the cache was
# already applied to k/v by the attention module), the Trainer's loss normaliser, a flash-attention determinism hint.
_INERT_KWARGS = frozenset({
    "cu_seq_lens_k", "max_length_q", "max_length_k", "max_seqlen_q", "max_seqlen_k", "use_cache", "cache_position",
    "num_items_in_batch", "output_attentions", "output_hidden_states", "output_router_logits", "return_dict",
    "deterministic",
})


def _check_kwargs(module, kwargs) -> None:
    for name, val in kwargs.items():
        if val is None or name in _HANDLED_KWARGS or name in _INERT_KWARGS:
            continue
        raise UnsupportedAttentionFeatureError(
            f"the litespark attention backend does not implement the argument {name}={_short(val)} that "
            f"{type(module).__name__} passes to its attention function (ignoring it would compute a different "
            f"attention). It understands dropout, scaling, sliding_window, is_causal, position_ids, cu_seq_lens_q/k, "
            f"max_length_q/k, seq_idx, softcap and s_aux (sinks). Use another attn_implementation (e.g. 'sdpa' or "
            f"'eager') for this model, or litespark_hf.apply(model, attention=False)."
        )


def _short(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"<tensor {tuple(val.shape)} {val.dtype}>"
    text = repr(val)
    return text if len(text) <= 60 else text[:57] + "..."


def _reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    visible: torch.Tensor | None,
    additive: torch.Tensor | None,
    scaling: float | None,
    softcap: float | None,
    sinks: torch.Tensor | None,
    dropout: float,
) -> torch.Tensor:
    """Plain PyTorch attention with the score modifications for the calls the kernel does not take (sinks; a
    soft-cap with a 4D mask), as transformers' eager code does them (gemma2 / gpt_oss ``eager_attention_forward``):
    scores ``* scaling``, then ``softcap * tanh(scores / softcap)``, then the mask, then (sinks) one extra logit per
    head joined to every row of the softmax and dropped after it. Computed in float32, cast back to the query's dtype.

    ``visible``: boolean [B or 1, 1 or H, Sq, Skv], True where a key may be attended; ``additive``: a float mask added
    to the scores (a user's 4D float mask). A query with no visible key outputs zeros (without sinks; with sinks the
    sink takes the whole row, which also gives zeros). Returns [B, Sq, Hq, D]."""
    groups = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if additive is not None:
        scores = scores + additive.float()
    has_key = None
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
        has_key = visible.any(-1, keepdim=True)
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        if has_key is not None:
            scores = scores.masked_fill(~has_key, 0.0)
        probs = torch.softmax(scores, dim=-1)
        if has_key is not None:
            probs = probs * has_key
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, v.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous()


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
    """transformers attention function: q [B,Hq,S,D], k/v [B,Hkv,S,D] -> ([B,S,Hq,D], None).

    ``softcap`` (attention logit soft-capping) goes to the kernel (`litespark_kernels.attention`, which runs its
    explicit-math reference for inputs the kernel does not take); ``s_aux`` (attention sinks), and ``softcap`` with
    transformers' 4D mask (KV cache), run on `_reference_attention`, with a one-time warning. Any other keyword
    argument that would change the attention and is not implemented here raises `UnsupportedAttentionFeatureError`
    (see ``_HANDLED_KWARGS`` / ``_INERT_KWARGS``)."""
    if kwargs:
        _check_kwargs(module, kwargs)
    softcap, sinks = kwargs.get("softcap"), kwargs.get("s_aux")
    causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    reference = sinks is not None
    if sinks is not None:
        warn_once("attention", "attention sinks (s_aux) are not in the kernel")
    if attention_mask is not None and attention_mask.dim() == 4:
        # transformers' own mask (KV cache, or a custom 4D mask from the user): SDPA with that mask.
        mask = attention_mask
        if reference or softcap is not None:
            if sinks is None:
                warn_once("attention", "attention logit soft-capping (softcap) with transformers' 4D mask (KV cache "
                                       "or a custom mask) is not in the kernel")
            boolean = mask.dtype == torch.bool
            out = _reference_attention(query, key, value, visible=mask if boolean else None,
                                       additive=None if boolean else mask, scaling=scaling, softcap=softcap,
                                       sinks=sinks, dropout=dropout)
            return out, None
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
            is_causal=False, enable_gqa=query.shape[1] != key.shape[1],
        )
        return out.transpose(1, 2).contiguous(), None
    q_seg, kv_seg = _segments(query, key, attention_mask, kwargs)
    if reference:
        visible = visibility_mask(
            query.shape[2], key.shape[2], causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
            sliding_window=effective_window(sliding_window, key.shape[2]), device=query.device,
        )
        out = _reference_attention(query, key, value, visible=visible, additive=None, scaling=scaling,
                                   softcap=softcap, sinks=sinks, dropout=dropout)
        return out, None
    out = lk.attention(
        query, key, value, scale=scaling, causal=causal, q_segment_ids=q_seg, kv_segment_ids=kv_seg,
        sliding_window=sliding_window, dropout_p=dropout, softcap=softcap,
        cudnn=module.__dict__.get(CUDNN_ATTR, False),
    )
    return out, None


CUDNN_ATTR = "_litespark_attention_cudnn"


def set_attention_cudnn(model: torch.nn.Module, enabled: bool) -> int:
    """Mark (or unmark) every attention module of ``model`` (those with q/k/v projections) for
    `LitesparkConfig.attention_cudnn`: their plain causal calls then run torch's cuDNN SDPA. Returns the number
    marked."""
    from .model_utils import set_module_flag

    return set_module_flag(model, CUDNN_ATTR, enabled, lambda m: hasattr(m, "q_proj") or hasattr(m, "qkv_proj"))


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
