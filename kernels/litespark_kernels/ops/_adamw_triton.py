"""Triton multi-tensor AdamW: one launch updates every tensor of a parameter group (see `optim.py` for the math).

Layout: a device table with one row per tensor, ``[param, grad, exp_avg, exp_avg_sq, shadow (or 0), numel]``
(addresses as int64), and a block map (for each program: its tensor and its first element). A program updates
``BLOCK`` consecutive elements of one tensor: loads p, g, m, v (fp32), stores p, m, v and, where the tensor has a
shadow, ``p`` rounded to bf16/fp16. Full blocks take an unmasked path, so loads and stores are vectorised; the
last block of a tensor is masked. The block map depends only on the tensors' sizes and is built once; the address
table is rebuilt (on the host, copied asynchronously) only when an address changes, e.g. gradients re-allocated
after ``zero_grad(set_to_none=True)`` at a new address.

Frozen rows/columns (``frozen``, see `optim.adamw_step`): a second, small table with one row per tensor,
``[keep mask (or 0), inner, size, layout]``, where element ``i`` of the flat tensor belongs to index
``(i // inner) % size`` of the frozen dimension (``inner`` = product of the later dimensions, ``size`` = that
dimension's length). ``layout`` spares the per-element integer divisions where the shape allows (the Llama-shaped
weights SAT freezes all do): 1 when ``inner`` is a multiple of the block (a whole block lies at one index: frozen
rows of a weight whose rows are a multiple of 1024 long; one flag per block), 2 when ``inner`` is 1 and ``size`` a
multiple of the block (a block covers consecutive indices of one row: frozen columns; a contiguous slice of the
mask), 0 otherwise (the general ``(i // inner) % size``). Only when some tensor has a mask is the variant with
``HAS_FROZEN`` compiled; in it, a tensor without a mask takes the usual paths, and a program of a masked tensor reads
its block's keep flags (layout 1: the one flag of its row; else one byte per element, from the row/column mask): a
block whose elements are all kept takes the unmasked path, a block whose elements are all frozen does nothing (frozen
rows: neither read nor written, no memory traffic), and a full block with both (frozen columns: every block of a
row) loads and stores every element unmasked, writing the frozen ones back with the bits they were read with
(`_adamw_update_select`), so they stay bit-for-bit as they were. Element-masked loads and stores there (session
9's version) cannot be vectorised: on the H200 they made the SAT 0.5 step's AdamW launch 14.7 ms against 8.7 ms for
the dense one (session 12 profile). Only a tensor's last, partial block is element-masked.

Memory traffic per element: 16 bytes read, 12 written, plus 2 for a shadow; torch's fused AdamW reads the same
16 bytes and writes 16 (it stores the scaled gradient back), and a separate cast to bf16 reads 4 and writes 2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import fast_launch

BLOCK = 1024
NUM_WARPS = 4
# BLOCK 1024 / 4 warps: 12.15 ms for the Llama-1B parameters on an H100 (3.0 TB/s) against 13.47 at 2048 / 4
# (benchmarks/bench_optimizer.py --sweep); streaming cache hints on the loads and stores changed nothing.


@triton.jit
def _adamw_math(p, g, m, v, SCALE, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps,
                HAS_SCALE: tl.constexpr):
    """One AdamW update of loaded fp32 values: (new p, new m, new v)."""
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(SCALE))
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * (g * g)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - tl.div_rn(step_size * m, denom)
    return p, m, v


@triton.jit
def _low(p, S_FP16: tl.constexpr):
    """``p`` rounded to the shadow's dtype (fp16 or bf16, round to nearest even)."""
    if S_FP16:
        s = p.to(tl.float16, fp_downcast_rounding="rtne")
    else:
        s = p.to(tl.bfloat16, fp_downcast_rounding="rtne")
    return s


@triton.jit
def _adamw_update(P, G, M, V, S, SCALE, offs, mask, has_s, decay, one_minus_beta1, beta2, one_minus_beta2, step_size,
                  bc2_sqrt, eps, HAS_SCALE: tl.constexpr, S_FP16: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:  # mask: in bounds (the last block of a tensor) and, for a frozen tensor, kept
        p = tl.load(P + offs, mask=mask, other=0.0)
        g = tl.load(G + offs, mask=mask, other=0.0)
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)
    else:
        p = tl.load(P + offs)
        g = tl.load(G + offs)
        m = tl.load(M + offs)
        v = tl.load(V + offs)
    p, m, v = _adamw_math(p, g, m, v, SCALE, decay, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt,
                          eps, HAS_SCALE)
    s = _low(p, S_FP16)
    if MASKED:
        tl.store(P + offs, p, mask=mask)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)
        if has_s:
            tl.store(S + offs, s, mask=mask)
    else:
        tl.store(P + offs, p)
        tl.store(M + offs, m)
        tl.store(V + offs, v)
        if has_s:  # one branch per program: the stores stay unmasked and vectorised
            tl.store(S + offs, s)


@triton.jit
def _adamw_update_select(P, G, M, V, S, SCALE, offs, keep, has_s, decay, one_minus_beta1, beta2, one_minus_beta2,
                         step_size, bc2_sqrt, eps, HAS_SCALE: tl.constexpr, S_FP16: tl.constexpr):
    """A full block of a tensor with frozen elements among kept ones: every element loaded and stored unmasked
    (128-bit accesses), the frozen ones stored as the bits they were loaded with (``tl.where`` selects, it does not
    compute), so they stay bit-for-bit as they were."""
    p0 = tl.load(P + offs)
    m0 = tl.load(M + offs)
    v0 = tl.load(V + offs)
    p, m, v = _adamw_math(p0, tl.load(G + offs), m0, v0, SCALE, decay, one_minus_beta1, beta2, one_minus_beta2,
                          step_size, bc2_sqrt, eps, HAS_SCALE)
    tl.store(P + offs, tl.where(keep, p, p0))
    tl.store(M + offs, tl.where(keep, m, m0))
    tl.store(V + offs, tl.where(keep, v, v0))
    if has_s:
        tl.store(S + offs, tl.where(keep, _low(p, S_FP16), tl.load(S + offs)))


@triton.jit
def _adamw_block(P, G, M, V, S, SCALE, start, offs, n, has_s, decay, one_minus_beta1, beta2, one_minus_beta2,
                 step_size, bc2_sqrt, eps, HAS_SCALE: tl.constexpr, S_FP16: tl.constexpr, BLOCK: tl.constexpr):
    """A block of a tensor without frozen rows/columns: unmasked when full, masked at the tensor's tail."""
    if start + BLOCK <= n:
        _adamw_update(P, G, M, V, S, SCALE, offs, offs, has_s, decay, one_minus_beta1, beta2, one_minus_beta2,
                      step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16, False)
    else:
        _adamw_update(P, G, M, V, S, SCALE, offs, offs < n, has_s, decay, one_minus_beta1, beta2,
                      one_minus_beta2, step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16, True)


@fast_launch
@triton.jit
def _adamw_kernel(TABLE, FROZEN, BLOCK_TENSOR, BLOCK_START, SCALE, decay, one_minus_beta1, beta2, one_minus_beta2,
                  step_size, bc2_sqrt, eps, HAS_SCALE: tl.constexpr, S_FP16: tl.constexpr, ALIGNED: tl.constexpr,
                  HAS_FROZEN: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(BLOCK_TENSOR + pid).to(tl.int64)
    start = tl.load(BLOCK_START + pid)
    row = TABLE + t * 6
    n = tl.load(row + 5)
    P = tl.load(row).to(tl.pointer_type(tl.float32))
    G = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    M = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    V = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    s_addr = tl.load(row + 4)
    has_s = s_addr != 0
    if S_FP16:
        S = s_addr.to(tl.pointer_type(tl.float16))
    else:
        S = s_addr.to(tl.pointer_type(tl.bfloat16))
    if ALIGNED:  # every address a multiple of 16 bytes (checked on the host): 128-bit accesses
        P = tl.multiple_of(P, 16)
        G = tl.multiple_of(G, 16)
        M = tl.multiple_of(M, 16)
        V = tl.multiple_of(V, 16)
        S = tl.multiple_of(S, 16)
    start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)
    if HAS_FROZEN:
        frow = FROZEN + t * 4
        k_addr = tl.load(frow)
        layout = tl.load(frow + 3)
        if k_addr != 0 and layout == 1:
            # the whole block at one index of the frozen dimension (every block full): one flag, kept or skipped
            inner = tl.load(frow + 1)
            size = tl.load(frow + 2)
            if tl.load(k_addr.to(tl.pointer_type(tl.int8)) + (start // inner) % size) != 0:
                _adamw_update(P, G, M, V, S, SCALE, offs, offs, has_s, decay, one_minus_beta1, beta2,
                              one_minus_beta2, step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16, False)
        elif k_addr != 0:
            if layout == 2:
                # consecutive indices of one row (inner 1, rows a multiple of BLOCK long; every block full)
                size = tl.load(frow + 2)
                idx = (start % size).to(tl.int32) + tl.arange(0, BLOCK)
                keep = tl.load(k_addr.to(tl.pointer_type(tl.int8)) + idx) != 0
            else:
                # index of each element along the frozen dimension, in int32 (`optim._check_frozen` checks that inner
                # and size + BLOCK fit): (offs // inner) % size, with the block's first quotient taken out in int64
                inner = tl.load(frow + 1)
                size = tl.load(frow + 2)
                q0 = start // inner
                r = (start - q0 * inner).to(tl.int32) + tl.arange(0, BLOCK)
                idx = ((q0 % size).to(tl.int32) + r // inner.to(tl.int32)) % size.to(tl.int32)
                inside = offs < n
                keep = inside & (tl.load(k_addr.to(tl.pointer_type(tl.int8)) + idx, mask=inside, other=0) != 0)
            kept = tl.sum(keep.to(tl.int32), axis=0)
            if kept == BLOCK:  # a full block of kept rows: the unmasked, vectorised path
                _adamw_update(P, G, M, V, S, SCALE, offs, keep, has_s, decay, one_minus_beta1, beta2,
                              one_minus_beta2, step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16, False)
            elif kept > 0:  # (a block of frozen elements only does nothing)
                if start + BLOCK <= n:  # mixed (frozen columns): unmasked accesses, frozen bits written back
                    _adamw_update_select(P, G, M, V, S, SCALE, offs, keep, has_s, decay, one_minus_beta1, beta2,
                                         one_minus_beta2, step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16)
                else:  # the tensor's tail: masked accesses
                    _adamw_update(P, G, M, V, S, SCALE, offs, keep, has_s, decay, one_minus_beta1, beta2,
                                  one_minus_beta2, step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16, True)
        else:
            _adamw_block(P, G, M, V, S, SCALE, start, offs, n, has_s, decay, one_minus_beta1, beta2,
                         one_minus_beta2, step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16, BLOCK)
    else:
        _adamw_block(P, G, M, V, S, SCALE, start, offs, n, has_s, decay, one_minus_beta1, beta2, one_minus_beta2,
                     step_size, bc2_sqrt, eps, HAS_SCALE, S_FP16, BLOCK)


def _block_map(numels: tuple[int, ...], block: int, device: torch.device):
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    tensor_of = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(int(counts.sum()), dtype=torch.int64) - first[tensor_of]) * block
    return tensor_of.to(torch.int32).to(device), start.to(device)


def _memo(cache: dict, slot: str, key, build):
    hit = cache.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = build()
    cache[slot] = (key, value)
    return value


def frozen_layout(inner: int, size: int, block: int = BLOCK) -> int:
    """The kernel's index arithmetic for a mask with these ``inner`` / ``size`` (see the module docstring): 1 (one
    index per block), 2 (consecutive indices of one row) or 0 (general)."""
    if inner % block == 0:
        return 1
    if inner == 1 and size % block == 0:
        return 2
    return 0


def _frozen_table(frozen, params, device: torch.device, cache: dict, block: int = BLOCK):
    """The ``[keep mask address, inner, size, layout]`` rows (one per tensor; zeros where nothing is frozen), and
    the masks themselves (kept alive with the table until the launch is queued)."""
    rows, masks = [], []
    for p, f in zip(params, frozen):
        if f is None:
            rows += [0, 0, 0, 0]
            continue
        dim, keep = f
        if keep.device != device or not keep.is_contiguous():
            keep = keep.to(device).contiguous()
        masks.append(keep)
        shape = p.shape
        inner = 1
        for d in shape[dim + 1:]:
            inner *= d
        rows += [keep.data_ptr(), inner, shape[dim], frozen_layout(inner, shape[dim], block)]
    key = tuple(rows)

    def build():
        host = torch.tensor(rows, dtype=torch.int64)
        return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)

    return _memo(cache, "frozen", key, build), masks


def adamw_step_triton(params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay, step,
                      grad_scale=None, shadows=None, frozen=None, cache: dict, block: int = BLOCK,
                      num_warps: int = NUM_WARPS):
    device = params[0].device
    numels = tuple(p.numel() for p in params)
    block_tensor, block_start = _memo(cache, "blocks", (numels, block, device),
                                      lambda: _block_map(numels, block, device))
    addrs, s_dtype = [], None
    for i, p in enumerate(params):
        s = shadows[i] if shadows is not None else None
        if s is not None:
            s_dtype = s.dtype
        addrs += [p.data_ptr(), grads[i].data_ptr(), exp_avgs[i].data_ptr(), exp_avg_sqs[i].data_ptr(),
                  s.data_ptr() if s is not None else 0, numels[i]]
    key = tuple(addrs)

    def build_table():
        host = torch.tensor(addrs, dtype=torch.int64)
        table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        return table, all(a % 16 == 0 for i, a in enumerate(addrs) if i % 6 != 5)

    table, aligned = _memo(cache, "table", key, build_table)
    has_frozen = frozen is not None and any(f is not None for f in frozen)
    frozen_rows, _masks = _frozen_table(frozen, params, device, cache, block) if has_frozen else (table, None)
    scale = grad_scale.to(device=device, dtype=torch.float32) if grad_scale is not None else table
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = (1.0 - beta2 ** step) ** 0.5
    grid = (block_tensor.numel(),)
    _adamw_kernel[grid](
        table, frozen_rows, block_tensor, block_start, scale, 1.0 - lr * weight_decay, 1.0 - beta1, beta2,
        1.0 - beta2, lr / bc1, bc2_sqrt, eps, HAS_SCALE=grad_scale is not None, S_FP16=s_dtype == torch.float16,
        ALIGNED=aligned, HAS_FROZEN=has_frozen, BLOCK=block, num_warps=num_warps,
    )
