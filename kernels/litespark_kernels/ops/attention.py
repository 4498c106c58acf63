"""Scaled dot-product attention for causal decoders: GQA, padding, packed documents, sliding window, dropout.

Specification (``attention_reference``), for q [B, Hq, Sq, D], k and v [B, Hkv, Skv, D] with Hq a multiple of Hkv
(query head h reads key/value head h // (Hq // Hkv)); the output is [B, Sq, Hq, D] (transformers' layout):

    score[b, h, i, j] = scale * <q[b, h, i], k[b, h // G, j]>
    score = softcap * tanh(score / softcap)        # only with ``softcap`` (Gemma-2's attention logit soft-capping)
    key j is visible from query i  iff
        (not causal or j <= i + (Skv - Sq))                       # bottom-right aligned causality
        and (sliding_window is None or (i + Skv - Sq) - j < sliding_window)   # transformers' sliding_window_overlay
        and kv_segment_ids[b, j] == q_segment_ids[b, i] and kv_segment_ids[b, j] >= 0
    out[b, i, h] = softmax_j(score over visible keys) @ v, in fp32, cast to q's dtype;
    a query with no visible key (a padding row) outputs zeros.

Segment ids (int32, one per token) encode padding (-1: never attended) and packed documents (tokens attend only
inside their own document); ``segment_ids_from_*`` build them from the inputs transformers hands the attention
function (2D padding mask, packed ``position_ids`` or ``cu_seq_lens``).

Soft-capping follows transformers' eager Gemma-2 attention: scores times ``scale``, then ``tanh(s / cap) * cap``, then
the mask, then the softmax in fp32. SDPA has no soft-cap, so calls with one that the kernel does not take (head dim,
dtype, dropout) run ``attention_reference``, which materialises the [Sq, Skv] scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._dispatch import autocast_dtype, device_supports, run_triton, unsupported, use_triton, warn_once

SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)
SOFTCAP_FALLBACK = ("attention logit soft-capping (softcap) on inputs the kernel does not take runs the explicit-math "
                    "reference (it materialises the [Sq, Skv] scores)")


def visibility_mask(
    q_len: int,
    kv_len: int,
    *,
    causal: bool = True,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean [B or 1, 1, Sq, Skv] mask: True where query i may attend key j (see the module docstring)."""
    i = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    j = torch.arange(kv_len, device=device)[None, :]
    allowed = torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        allowed &= j <= i
    if sliding_window is not None:
        allowed &= (i - j) < sliding_window
    allowed = allowed[None, None]
    if q_segment_ids is not None or kv_segment_ids is not None:
        if q_segment_ids is None or kv_segment_ids is None:
            raise ValueError("q_segment_ids and kv_segment_ids must be given together")
        same = q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
        allowed = allowed & same & (kv_segment_ids[:, None, None, :] >= 0)
    return allowed


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """Explicit-math attention (materialises the [Sq, Skv] scores): the specification and test oracle."""
    _check_shapes(q, k, v)
    _check_softcap(softcap)
    B, Hq, Sq, D = q.shape
    groups = Hq // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    kk = k.repeat_interleave(groups, dim=1)
    vv = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), kk.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = visibility_mask(
        Sq, k.shape[2], causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window, device=q.device,
    )
    scores = scores.masked_fill(~allowed, float("-inf"))
    has_key = allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, vv.float()).to(q.dtype)
    return out.transpose(1, 2).contiguous()


def attention_sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Same function through ``torch.nn.functional.scaled_dot_product_attention``: the fallback path.

    Used on CPU and for inputs the Triton kernel does not take. A plain causal call with no segments and no window
    goes through SDPA's ``is_causal`` fast path; anything else gets an explicit boolean mask.
    """
    _check_shapes(q, k, v)
    Sq, Skv = q.shape[2], k.shape[2]
    sliding_window = effective_window(sliding_window, Skv)
    gqa = q.shape[1] != k.shape[1]
    plain = q_segment_ids is None and sliding_window is None and (not causal or Sq == Skv or Sq == 1)
    if plain:
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal and Sq > 1, scale=scale, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous()
    allowed = visibility_mask(
        Sq, Skv, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window, device=q.device,
    )
    has_key = allowed.any(-1, keepdim=True)
    # Rows with no visible key would give NaN; let them see everything and zero them afterwards.
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed | ~has_key, dropout_p=dropout_p, scale=scale, enable_gqa=gqa
    )
    out = out * has_key.to(out.dtype)
    return out.transpose(1, 2).contiguous()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    q_segment_ids: torch.Tensor | None = None,
    kv_segment_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    dropout_p: float = 0.0,
    softcap: float | None = None,
    cudnn: bool = False,
) -> torch.Tensor:
    """Attention with the semantics of ``attention_reference``; Triton kernel where it applies, SDPA otherwise
    (``attention_reference`` with a ``softcap``: SDPA has none). Under autocast, float32 q/k/v are cast to the
    autocast dtype first, as SDPA (on autocast's low-precision list) does: e.g. Qwen3's q/k norms with float32
    weights return float32, which the kernel would otherwise refuse.

    ``cudnn``: plain causal calls (equal query and key lengths, no segment ids, no window, no soft-cap, no dropout;
    bf16/fp16, head dim 64 or 128, on a Hopper-or-newer GPU whose torch has cuDNN SDPA) run torch's cuDNN attention
    (`attention_cudnn`) instead of the Triton kernel; every other call is unchanged. The choice reads only shapes,
    dtypes and arguments (no host sync)."""
    low = autocast_dtype(q.device.type)
    if low is not None and q.dtype == torch.float32:
        q, k, v = q.to(low), k.to(low), v.to(low)
    sliding_window = effective_window(sliding_window, k.shape[2])
    if cudnn and _cudnn_takes(q, k, causal, q_segment_ids, kv_segment_ids, sliding_window, dropout_p, softcap):
        return attention_cudnn(q, k, v, scale=scale)
    kwargs = dict(
        scale=scale, causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window, dropout_p=dropout_p,
    )
    if use_triton("attention", q, k, v) and _triton_supports(q, k, dropout_p):
        if softcap is not None:
            kwargs["softcap"] = softcap
        return run_triton("_attention_triton", "attention_triton", q, k, v, **kwargs)
    if softcap is not None:
        warn_once("attention", SOFTCAP_FALLBACK)
        return attention_reference(q, k, v, softcap=softcap, **kwargs)
    return attention_sdpa(q, k, v, **kwargs)


CUDNN_HEAD_DIMS = (64, 128)


def _cudnn_check(device: torch.device) -> bool:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0):
        return False
    q = torch.randn(1, 4, 64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    kv = torch.randn(1, 2, 64, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    out.sum().backward()
    return bool(torch.isfinite(q.grad).all().item())


def cudnn_plain_call(q, k, causal, q_segment_ids, kv_segment_ids, sliding_window, dropout_p, softcap) -> bool:
    """Whether a call is one `attention_cudnn` computes the same (plain causal, equal lengths, bf16/fp16, head dim
    64 or 128); the device is not looked at."""
    return (causal and q_segment_ids is None and kv_segment_ids is None and sliding_window is None
            and dropout_p == 0.0 and softcap is None and q.shape[2] == k.shape[2]
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] in CUDNN_HEAD_DIMS)


def _cudnn_takes(q, k, causal, q_segment_ids, kv_segment_ids, sliding_window, dropout_p, softcap) -> bool:
    if not (q.is_cuda and cudnn_plain_call(q, k, causal, q_segment_ids, kv_segment_ids, sliding_window, dropout_p,
                                           softcap)):
        return False  # the Triton kernel (or its fallbacks), as without ``cudnn``
    if not device_supports("cudnn_sdpa", q.device, _cudnn_check):
        warn_once("attention (cudnn)", "this GPU or torch has no cuDNN SDPA (Hopper or newer needed); the Triton "
                                       "kernel runs")
        return False
    return True


def attention_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Plain causal attention through torch's cuDNN SDPA backend (grouped-query included), returned as
    ``[B, S, Hq, D]`` like the kernel's output; its backward is torch's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2).contiguous()  # free when cuDNN wrote the query's [B, S, H, D] layout


def effective_window(sliding_window: int | None, kv_len: int) -> int | None:
    """None when the window cannot hide any key: query-key distances are at most ``kv_len - 1`` (a StarCoder2 window of
    4096 on 2048-token rows). Keeps such calls on the unmasked fast paths."""
    if sliding_window is None or sliding_window >= kv_len:
        return None
    if sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    return sliding_window


def _triton_supports(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return unsupported("attention", f"head dim {q.shape[-1]} (kernel takes {SUPPORTED_HEAD_DIMS})")
    if q.dtype not in (torch.float16, torch.bfloat16) and not (q.device.type == "cpu"):
        return unsupported("attention", f"dtype {q.dtype} (kernel takes float16 and bfloat16)")
    if dropout_p > 0.0:
        return unsupported("attention", "attention dropout > 0 runs through SDPA (documented fallback)")
    return True


def _check_softcap(softcap: float | None) -> None:
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 (or None), got {softcap}")


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,Hq,Sq,D] and k, v [B,Hkv,Skv,D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")


def segment_ids_from_padding_mask(mask_2d: torch.Tensor) -> torch.Tensor:
    """[B, S] padding mask (1/True = token) -> int32 segment ids: 0 for tokens, -1 for padding."""
    return torch.where(mask_2d.bool(), 0, -1).to(torch.int32)


def segment_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Packed ``position_ids`` [B, S] -> int32 document index per token; a document starts where the position does
    not continue the previous one by +1 (transformers' ``find_packed_sequence_indices``)."""
    first = position_ids[:, :1] - 1
    diff = torch.diff(position_ids, prepend=first, dim=-1)
    return (diff != 1).cumsum(-1).to(torch.int32)


def segment_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """``cu_seq_lens`` [n_docs + 1] over one packed row of ``total`` tokens -> int32 [1, total] document index;
    tokens past the last boundary are padding (-1)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    doc = torch.where(positions < cu_seqlens[-1], doc, -1)
    return doc.to(torch.int32)[None]
