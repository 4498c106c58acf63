"""Chunked fused linear + cross-entropy (Triton + cuBLAS): the [tokens, vocab] logits never exist at once.

Same function as ``fused_linear_cross_entropy_reference`` (transformers' ``ForCausalLMLoss`` on
``hidden @ weight.T (+ bias)``), computed as follows.

1. Flatten ``hidden`` to [N, H], shift the labels (unless ``shift_labels`` is given) and keep only the rows whose
   label is not ``ignore_index``. In SFT most rows are often ignored and cost nothing. The number of kept rows
   must reach the host: given a `LabelCount` made when the labels arrived (``label_count=``;
   `litespark_hf` makes one before the decoder runs) it is read from a copy that finished long ago and the rows
   are found with ``nonzero_static``, so the GPU's queue is not drained; without one, ``nonzero`` syncs here.
2. For each chunk of at most ``rows`` kept rows (the chunk's logits take at most ``LITESPARK_FLCE_CHUNK_MB``
   MiB, default 512):
   - ``logits = h_chunk @ W^T (+ b)`` with cuBLAS, in the compute dtype (bf16 in mixed precision: this is the
     rounding the reference makes too, as ``F.linear`` returns bf16 logits that it then upcasts);
   - one Triton program per row reads the row twice (max / log-sum-exp in fp32, then the gradient), stores the
     row's loss ``lse - logit[target]`` in fp32 and overwrites the logits IN PLACE with
     ``d loss / d logits = (softmax - onehot) * scale`` (``scale`` = 1 / number of kept rows, or
     1 / ``num_items_in_batch``; read from device memory, so a tensor ``num_items_in_batch`` needs no sync);
     with ``softcap`` (Gemma's final-logit soft-capping) each logit z is first replaced, in fp32, by
     ``c = softcap * tanh(z / softcap)`` in both passes (recomputed from z: no extra store), and the gradient
     written is ``d loss / d c * (1 - tanh(z / softcap)^2)``;
   - ``grad_hidden[rows] = dlogits @ W`` and ``grad_W += dlogits^T @ h_chunk`` (cuBLAS; fp32 accumulator,
     written by cuBLAS's epilogue when torch supports ``addmm(..., out_dtype=float32)`` for bf16/fp16 inputs),
     ``grad_b += dlogits.sum(0)`` in fp32.
3. The loss is a scalar, so the gradients are final after the forward; backward only multiplies them by
   ``grad_output`` in place, in a kernel that reads ``grad_output`` on the device and returns at once when it is 1
   (the usual case): no host sync.

Memory beyond the inputs: one chunk of logits, one chunk of gathered hidden rows and of their gradient, the full
``grad_hidden`` (as the reference) and ``grad_W`` (fp32 while accumulating; for bf16/fp16 weights it is cast to the
weight dtype at the end of the forward, so for a moment both exist: 1.5x a fp32 weight-sized buffer at most).

Semantics kept from the reference: mean over zero kept rows gives NaN (0/0) with zero gradients; sum / 0 likewise.
Under autocast the matmuls run in the autocast dtype (as ``F.linear`` would), gradients come back in the inputs'
dtypes. Labels outside [0, vocab) other than ``ignore_index`` are not checked (the reference raises).
With a frozen weight (LoRA: ``weight.requires_grad`` False) no weight gradient is computed; without grad mode no
gradient at all.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._launch import fast_launch

from .._dispatch import autocast_dtype, device_supports, sm_count
from .fused_linear_cross_entropy import LabelCount, shifted_labels

_DEFAULT_CHUNK_MB = 512  # H100, V=128256: 512 MiB ran 7% faster than 256 MiB at the same peak (NOTES.md)


@triton.jit
def _tanh(x):
    """tanh in fp32 from one exp: sign(x) (1 - e) / (1 + e), e = exp(-2|x|) in (0, 1] (no overflow, tanh(+-inf) =
    +-1); absolute error ~1e-7 near 0."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softcap(x, softcap):
    """softcap * tanh(x / softcap) (Gemma's final-logit soft-capping)."""
    return softcap * _tanh(x / softcap)


@fast_launch
@triton.jit
def _ce_rows_kernel(
    logits_ptr,  # [rows, V] logits of one chunk; overwritten with d loss / d logits when WRITE_GRAD
    stride_row,
    target_ptr,  # [rows] int64
    loss_ptr,  # [rows] fp32: lse - logit[target], 0 for ignored rows
    scale_ptr,  # [1] fp32: gradient scale (1 / n_items)
    V,
    ignore_index,
    softcap,  # fp32 cap (read only when SOFTCAP)
    BLOCK_V: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    offs = tl.arange(0, BLOCK_V)

    # Pass 1: running max and sum of exp over the row, in fp32 (first block peeled: no -inf - -inf).
    x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    if SOFTCAP:  # the masked lanes' -inf becomes -softcap: masked again
        x = tl.where(offs < V, _softcap(x, softcap), float("-inf"))
    m = tl.max(x, axis=0)
    s = tl.sum(tl.exp(x - m), axis=0)
    for start in range(BLOCK_V, V, BLOCK_V):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        if SOFTCAP:
            x = tl.where(cols < V, _softcap(x, softcap), float("-inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    safe_target = tl.where(valid, target, 0)
    x_target = tl.load(base + safe_target).to(tl.float32)
    if SOFTCAP:
        x_target = _softcap(x_target, softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - x_target, 0.0))

    if WRITE_GRAD:
        # Pass 2: (softmax - onehot) * scale (times d c / d z = 1 - tanh^2 with SOFTCAP), written over the logits
        # (zero for an ignored row).
        scale = tl.load(scale_ptr)
        scale = tl.where(valid, scale, 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = _tanh(x / softcap)
                p = tl.exp(softcap * t - lse)
                g = (p - tl.where(cols == target, 1.0, 0.0)) * scale * (1.0 - t * t)
            else:
                p = tl.exp(x - lse)
                g = (p - tl.where(cols == target, 1.0, 0.0)) * scale
            tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_ce_rows(logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, scale: torch.Tensor,
                    ignore_index: int, write_grad: bool, block_v: int | None = None,
                    softcap: float | None = None) -> None:
    rows, vocab = logits.shape
    if rows == 0:
        return
    if block_v is None:
        block_v = min(4096, triton.next_power_of_2(vocab))
    num_warps = 8 if block_v >= 2048 else 4
    _ce_rows_kernel[(rows,)](
        logits, logits.stride(0), target, loss, scale, vocab, ignore_index,
        float(softcap) if softcap is not None else 1.0,
        BLOCK_V=block_v, WRITE_GRAD=write_grad, SOFTCAP=softcap is not None, num_warps=num_warps,
    )


@fast_launch
@triton.jit
def _scale_unless_one_kernel(X, G, n, BLOCK: tl.constexpr):
    """X *= G[0] in place, over a persistent grid; every program returns at once when G[0] == 1."""
    g = tl.load(G).to(tl.float32)
    if g != 1.0:
        for start in range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            x = tl.load(X + offs, mask=mask)
            tl.store(X + offs, (x.to(tl.float32) * g).to(X.dtype.element_ty), mask=mask)


def _scale_unless_one(t: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor | None:
    """``t * g`` for a device scalar ``g`` without a host sync (in place; ``t`` is ours and contiguous)."""
    if t is None or t.numel() == 0:
        return t
    block = 4096
    grid = (max(1, min(triton.cdiv(t.numel(), block), sm_count(t.device) * 8)),)
    _scale_unless_one_kernel[grid](t, g, t.numel(), BLOCK=block, num_warps=8)
    return t


def _nonzero_static_check(device: torch.device) -> bool:
    return torch.nonzero_static(torch.ones(2, dtype=torch.bool, device=device), size=1).numel() == 1


def _kept_rows(valid: torch.Tensor, n_valid: int) -> torch.Tensor:
    """Indices of the True entries of ``valid`` when their number is known (no sync where supported)."""
    if device_supports("nonzero_static", valid.device, _nonzero_static_check):
        return torch.nonzero_static(valid, size=n_valid).squeeze(1)
    return valid.nonzero().squeeze(1)


def _addmm_fp32_check(device: torch.device) -> bool:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(48, 40, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(40, 56, device=device, generator=gen).to(torch.bfloat16)
    c = torch.randn(48, 56, device=device, generator=gen)
    want = c + a.float() @ b.float()
    torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
    first = torch.full_like(c, float("nan"))  # beta=0 must ignore the accumulator (the first chunk's write)
    torch.addmm(first, a, b, beta=0.0, out_dtype=torch.float32, out=first)
    return bool(torch.allclose(c, want, rtol=1e-3, atol=1e-2)
                and torch.allclose(first, a.float() @ b.float(), rtol=1e-3, atol=1e-2))


def _addmm_fp32_supported(device: torch.device) -> bool:
    """Whether this torch/cuBLAS adds a bf16/fp16 product into a fp32 matrix in one call (checked once)."""
    return device.type == "cuda" and device_supports("addmm_fp32", device, _addmm_fp32_check)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fused_fp32: bool,
                   first: bool = False) -> None:
    """acc += a @ b (acc = a @ b when ``first``: acc may be uninitialised), acc may be fp32 while a, b are bf16/fp16.

    ``first`` uses beta=0, with which addmm ignores acc's contents (NaN and inf included): the accumulator needs no
    zero-fill (for the LM head's weight gradient, a vocab x hidden fp32 memset per step)."""
    beta = 0.0 if first else 1.0
    if acc.dtype == a.dtype:
        torch.addmm(acc, a, b, beta=beta, out=acc)
    elif fused_fp32:
        torch.addmm(acc, a, b, beta=beta, out_dtype=acc.dtype, out=acc)
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


_VOCAB_ALIGN = 64  # a vocabulary that is not a multiple of 8 is padded to a multiple of this for the GEMMs


def _chunk_rows(n: int, vocab: int, elem_size: int, chunk_bytes: int | None) -> int:
    if chunk_bytes is None:
        chunk_bytes = int(float(os.environ.get("LITESPARK_FLCE_CHUNK_MB", _DEFAULT_CHUNK_MB)) * 2**20)
    max_rows = max(1, chunk_bytes // max(1, vocab * elem_size))
    if max_rows >= 128:
        max_rows = max_rows // 64 * 64  # GEMM-friendly
    n_chunks = max(1, math.ceil(n / max_rows))
    return max(1, math.ceil(n / n_chunks))


def _flce_compute(hidden2d, weight, bias, target, ignore_index, num_items_in_batch, need_gh, need_gw, need_gb,
                  *, chunk_bytes=None, chunk_rows=None, accum_dtype=None, block_v=None, label_count=None,
                  softcap=None):
    """Loss and (optionally) gradients. hidden2d [N, H] and weight [V, H] (and bias [V]) in the compute dtype;
    ``softcap``: final-logit soft-capping of each chunk's logits (in the row kernel).

    Returns (loss fp32 scalar, grad_hidden [N, H] compute dtype or None, grad_weight (accum dtype) or None,
    grad_bias fp32 or None).
    """
    device = hidden2d.device
    n, _ = hidden2d.shape
    vocab = weight.shape[0]
    cdt = hidden2d.dtype
    need_grad = need_gh or need_gw or need_gb

    if label_count is not None:  # counted when the labels arrived: its copy to the host is long done
        valid = label_count.valid.reshape(-1)
        n_valid = label_count.value()
        gather = n_valid != n
        idx = _kept_rows(valid, n_valid) if gather else None
    else:
        valid = target != ignore_index
        idx = valid.nonzero().squeeze(1)
        n_valid = idx.numel()  # host sync
        gather = n_valid != n

    # Loss normaliser and the gradient scale (device tensor: no sync for a tensor num_items_in_batch).
    if num_items_in_batch is None:
        denom = n_valid
        scale = torch.full((1,), 1.0 / n_valid if n_valid else 0.0, dtype=torch.float32, device=device)
    elif torch.is_tensor(num_items_in_batch):
        denom = num_items_in_batch.to(device)
        scale = (1.0 / denom.to(torch.float32)).reshape(1)
    else:
        denom = num_items_in_batch
        scale = torch.full((1,), (1.0 / denom) if denom else float("inf"), dtype=torch.float32, device=device)

    grad_hidden = grad_weight = grad_bias = None
    fused_fp32 = False
    if need_gh:
        grad_hidden = (torch.zeros if gather else torch.empty)((n, hidden2d.shape[1]), dtype=cdt, device=device)
    # A vocabulary that is not a multiple of 8 (Granite's 49,155) is padded with zero rows of the weight (and zero
    # bias) to a multiple of 64 for the GEMMs: with an odd extent along the contiguous dimension of the logits,
    # cuBLAS can only use its align-1 kernels for all three GEMMs (on the H200 43 ms of a 145 ms granite-1b step).
    # The padded columns are never read by the row kernel (it sees the [:, :vocab] view); their logits are h . 0 = 0
    # and their gradient stays 0, so they add nothing to grad_hidden; grad_weight is the [:vocab] rows.
    vocab_p = vocab if vocab % 8 == 0 else -(-vocab // _VOCAB_ALIGN) * _VOCAB_ALIGN
    if need_gw:
        acc_dtype = accum_dtype or (torch.float32 if cdt in (torch.bfloat16, torch.float16) else cdt)
        # written by the first chunk's GEMM (beta=0); zeros only if no row is counted
        grad_weight = (torch.empty if n_valid else torch.zeros)((vocab_p, weight.shape[1]), dtype=acc_dtype,
                                                                device=device)
        fused_fp32 = acc_dtype != cdt and _addmm_fp32_supported(device)
    if need_gb:
        grad_bias = torch.zeros(vocab, dtype=torch.float32, device=device)

    losses = torch.empty(n_valid, dtype=torch.float32, device=device)
    if n_valid:
        rows = chunk_rows or _chunk_rows(n_valid, vocab, hidden2d.element_size(), chunk_bytes)
        rows = min(rows, n_valid)
        logits_buf = torch.empty((rows, vocab_p), dtype=cdt, device=device)
        if vocab_p != vocab:  # one padded copy (zero rows / zero bias), one kernel each
            weight = F.pad(weight, (0, 0, 0, vocab_p - vocab))
            bias = F.pad(bias, (0, vocab_p - vocab)) if bias is not None else None
        w_t = weight.t()
        for start in range(0, n_valid, rows):
            end = min(start + rows, n_valid)
            m = end - start
            if gather:
                sel = idx[start:end]
                h = hidden2d.index_select(0, sel)
                t = target.index_select(0, sel)
            else:
                h = hidden2d[start:end]
                t = target[start:end]
            logits = logits_buf[:m]
            if bias is not None:
                torch.addmm(bias, h, w_t, out=logits)
            else:
                torch.mm(h, w_t, out=logits)
            _launch_ce_rows(logits[:, :vocab], t, losses[start:end], scale, ignore_index, need_grad, block_v,
                            softcap)
            if need_gh:
                if gather:
                    grad_hidden.index_copy_(0, sel, logits @ weight)
                else:
                    torch.mm(logits, weight, out=grad_hidden[start:end])
            if need_gw:
                _accumulate_mm(grad_weight, logits.t(), h, fused_fp32, first=start == 0)
            if need_gb:
                grad_bias.add_(logits[:, :vocab].sum(0, dtype=torch.float32))
    if grad_weight is not None and vocab_p != vocab:
        grad_weight = grad_weight[:vocab]
    loss = losses.sum() / denom
    return loss, grad_hidden, grad_weight, grad_bias


def loss_arguments(hidden, weight, labels, shift_labels, ignore_index, softcap):
    """(flat int64 targets on hidden's device, softcap as a float or None) from the public arguments, checked (also
    used by the torch.compile custom op)."""
    if shift_labels is None:
        if labels is None:
            raise ValueError("give labels or shift_labels")
        shift_labels = shifted_labels(labels, ignore_index)
    target = shift_labels.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    if target.numel() * hidden.shape[-1] != hidden.numel():
        raise ValueError(f"labels {tuple(shift_labels.shape)} do not match hidden {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} != weight's {weight.shape[-1]}")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise ValueError(f"softcap must be positive, got {softcap}")
    return target, softcap


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, ignore_index, num_items_in_batch, compute_dtype, options,
                weight_cast, tied, softcap):
        need_gh, need_gw, need_gb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        h2d = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
        w = weight_cast if weight_cast is not None else weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            loss, gh, gw, gb = _flce_compute(h2d, w, b, target, ignore_index, num_items_in_batch,
                                             need_gh, need_gw, need_gb, softcap=softcap, **options)
        if gh is not None:
            gh = gh.view(hidden.shape).to(hidden.dtype)
        if gw is not None and gw.dtype != weight.dtype:
            gw = gw.to(weight.dtype)
        if gb is not None and gb.dtype != bias.dtype:
            gb = gb.to(bias.dtype)
        ctx.tied = (tied, weight) if tied is not None else None
        ctx.grads = (gh, gw, gb)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("litespark fused linear cross-entropy: its gradients are computed in the forward and "
                               "handed out once, so its loss can be backpropagated only once (retain_graph / a "
                               "second backward are not supported); use fused_cross_entropy=False for that")
        gh, gw, gb = ctx.grads
        ctx.grads = None
        g = grad_output.reshape(1).to(torch.float32)
        if g.device.type == "cuda":  # no sync: the kernel returns at once when grad_output is 1
            gh, gw, gb = (_scale_unless_one(t, g) for t in (gh, gw, gb))
        else:  # Triton's CPU interpreter (tests)
            gh, gw, gb = (t * g.to(t.dtype) if t is not None else None for t in (gh, gw, gb))
        if ctx.tied is not None:  # the tied embedding's backward (run next) adds its rows into the gw returned here
            tied, weight = ctx.tied
            ctx.tied = None
            tied.offer(gw, weight)
        return gh, gw, gb, None, None, None, None, None, None, None, None


def fused_linear_cross_entropy_triton(
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
    _options: dict | None = None,
) -> torch.Tensor:
    """Chunked fused linear + cross-entropy; same loss and gradients as ``fused_linear_cross_entropy_reference``
    (``softcap``: final-logit soft-capping, applied in fp32 to each chunk's logits).

    ``_options`` (tuning and tests): ``chunk_bytes`` / ``chunk_rows`` (chunk size), ``accum_dtype`` (dtype of the
    weight-gradient accumulator; default fp32 for bf16/fp16), ``block_v`` (Triton block over the vocabulary).
    """
    target, softcap = loss_arguments(hidden, weight, labels, shift_labels, ignore_index, softcap)
    options = dict(_options or {})
    if label_count is not None:
        if label_count.valid.numel() != target.numel() or label_count.valid.device != target.device:
            raise ValueError("label_count was made from other labels (count_labels(shift_labels) of these labels)")
        options["label_count"] = label_count
    compute_dtype = autocast_dtype(hidden.device.type) or hidden.dtype
    if weight_cast is not None and (weight_cast.dtype != compute_dtype or weight_cast.shape != weight.shape
                                    or weight_cast.device != weight.device):
        weight_cast = None
    needs_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, target, ignore_index, num_items_in_batch,
                                              compute_dtype, options, weight_cast, tied_grad, softcap)
    h2d = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        loss, _, _, _ = _flce_compute(
            h2d, weight_cast if weight_cast is not None else weight.to(compute_dtype),
            bias.to(compute_dtype) if bias is not None else None, target,
            ignore_index, num_items_in_batch, False, False, False, softcap=softcap, **options)
    return loss
