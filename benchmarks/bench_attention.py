"""Attention benchmark: litespark's Triton kernel against PyTorch SDPA (flash and cuDNN backends), bf16, GQA.

Six causal shapes of benchmarks/baselines.md (fwd+bwd and forward only), one packed-documents shape and one
sliding-window shape (against SDPA with the equivalent explicit boolean mask, k/v repeated as transformers does
when it passes a mask, and against torch's compiled flex attention with the block mask: transformers'
``flex_attention``), and Gemma-2's attention logit soft-cap (50) on the gemma2-1b bench shape (seq 2048, batch 4,
8 query / 4 key-value heads): the kernel with the cap at head dims 128 and 256 (Gemma-2's own), against the kernel
without it, SDPA flash without it (no soft-cap there) and the explicit-math reference with it (what runs without the
kernel: the [S, S] scores materialised). TFLOP/s by the FlashAttention convention: forward 4 * B * S^2 * Hq * D, halved under
causality, times 3.5 for forward+backward (backward = 2.5 forwards); the packed and window shapes count only the
visible (query, key) pairs. Median times from ``triton.testing.do_bench``.

On the six causal shapes ``litespark_choice`` is the op's per-call choice under ``attention_cudnn`` (cuDNN SDPA for
a plain causal call, on the model's layout); packed, windowed and soft-capped calls always take the kernel. On the
packed shape ``litespark_segment_full`` is the kernel with the experimental ``LITESPARK_ATTN_SEGMENT_FULL`` option
(blocks inside one document skip the segment mask).

litespark gets q/k/v as transformers hands them ([B, H, S, D] transposes of [B, S, H, D] tensors) and writes its
output as [B, S, H, D]; SDPA gets contiguous [B, H, S, D] tensors (its natural layout, as in baselines.md).

    python benchmarks/bench_attention.py [--out DIR] [--sweep]     # writes attention_<device>.json and .png
    python benchmarks/bench_attention.py --sweep-only --sweep-dims 256   # time the head-dim-256 configurations only

``run()`` returns the rows (list of dicts) for the combined benchmark runner; ``--sweep`` also times the launch
configurations of each kernel (forward, backward dK/dV, backward dQ) on one shape per head dim.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

# The six shapes of baselines.md: (S, B, D, Hq, Hkv).
SHAPES = [
    (2048, 8, 64, 32, 8), (2048, 8, 128, 24, 8),
    (4096, 4, 64, 32, 8), (4096, 4, 128, 24, 8),
    (8192, 2, 64, 32, 8), (8192, 2, 128, 24, 8),
]
PACKED = dict(S=4096, B=4, D=128, Hq=24, Hkv=8, docs=[[1536, 1024, 1024, 512], [512, 2048, 1024, 512],
                                                      [1024, 1024, 1024, 1024], [2560, 512, 512, 512]])
WINDOW = dict(S=4096, B=4, D=128, Hq=24, Hkv=8, window=1024)
SOFTCAP = dict(S=2048, B=4, Hq=8, Hkv=4, softcap=50.0, head_dims=(128, 256))


def _bench(fn, grad_to_none=None) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")


def _inputs(B, S, Hq, Hkv, D, hf_layout: bool, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    if hf_layout:
        q = torch.randn(B, S, Hq, D, **kw).transpose(1, 2)
        k = torch.randn(B, S, Hkv, D, **kw).transpose(1, 2)
        v = torch.randn(B, S, Hkv, D, **kw).transpose(1, 2)
        do = torch.randn(B, S, Hq, D, **kw)
    else:
        q = torch.randn(B, Hq, S, D, **kw)
        k = torch.randn(B, Hkv, S, D, **kw)
        v = torch.randn(B, Hkv, S, D, **kw)
        do = torch.randn(B, Hq, S, D, **kw)
    return [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do]


def _time_fwd_bwd(fn, q, k, v, do) -> tuple[float, float]:
    """(forward-only ms, forward+backward ms)."""
    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        fn(q, k, v).backward(do)

    return _bench(fwd), _bench(fwd_bwd, grad_to_none=[q, k, v])


def _litespark(**kw):
    from litespark_kernels.ops._attention_triton import attention_triton

    return lambda q, k, v: attention_triton(q, k, v, **kw)


def _choice():
    """What `LitesparkConfig.attention_cudnn` runs: the op's per-call choice (cuDNN SDPA for a plain causal call, the
    Triton kernel for the others), on the model's layout."""
    from litespark_kernels.ops.attention import attention

    return lambda q, k, v: attention(q, k, v, causal=True, cudnn=True)


def _sdpa_backend(backend):
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return fn


def flex_mask_mod(seg: torch.Tensor | None = None, window: int | None = None):
    """The flex-attention ``mask_mod`` of a causal call: within a document (``seg`` [B, S] segment ids) or within a
    sliding ``window`` of keys (the key at distance ``window - 1`` still seen, as the kernel's ``sliding_window``)."""
    def mask_mod(b, h, q, kv):
        keep = q >= kv
        if seg is not None:
            keep = keep & (seg[b, q] == seg[b, kv])
        if window is not None:
            keep = keep & (q - kv < window)
        return keep

    return mask_mod


def _flex(B, S, seg=None, window=None):
    """torch's flex attention (what transformers runs with ``attn_implementation="flex_attention"``), compiled, with
    the block mask of the documents or the window: the block-sparse alternative to the kernel on these shapes."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    block_mask = create_block_mask(flex_mask_mod(seg, window), B, None, S, S, device="cuda")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask, enable_gqa=True)


def _sdpa_masked(mask, groups):
    def fn(q, k, v):
        kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)

    return fn


def _row(shape_name, variant, fwd_ms, fb_ms, fwd_flops, **extra):
    return dict(
        shape=shape_name, variant=variant, fwd_ms=round(fwd_ms, 4), fwd_bwd_ms=round(fb_ms, 4),
        fwd_tflops=round(fwd_flops / fwd_ms * 1e-9, 1), fwd_bwd_tflops=round(3.5 * fwd_flops / fb_ms * 1e-9, 1),
        **extra,
    )


def _try(rows, shape_name, variant, fn, inputs, fwd_flops, **extra):
    try:
        fwd_ms, fb_ms = _time_fwd_bwd(fn, *inputs)
    except Exception as e:  # a backend that refuses the inputs: record why
        rows.append(dict(shape=shape_name, variant=variant, error=f"{type(e).__name__}: {str(e)[:200]}", **extra))
        print(f"  {shape_name} {variant}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        return
    rows.append(_row(shape_name, variant, fwd_ms, fb_ms, fwd_flops, **extra))
    r = rows[-1]
    print(f"  {shape_name:28s} {variant:18s} fwd {r['fwd_ms']:8.3f} ms {r['fwd_tflops']:6.1f} TF/s | "
          f"fwd+bwd {r['fwd_bwd_ms']:8.3f} ms {r['fwd_bwd_tflops']:6.1f} TF/s", flush=True)


def run() -> list[dict]:
    """Benchmark rows: one dict per (shape, variant) with times in ms and TFLOP/s."""
    from torch.nn.attention import SDPBackend

    from litespark_kernels.ops.attention import segment_ids_from_cu_seqlens, visibility_mask

    rows: list[dict] = []
    for S, B, D, Hq, Hkv in SHAPES:
        name = f"causal S{S} B{B} D{D} H{Hq}/{Hkv}"
        fwd_flops = 4 * B * S * S * Hq * D / 2
        base = dict(S=S, B=B, D=D, Hq=Hq, Hkv=Hkv, causal=True)
        hf = _inputs(B, S, Hq, Hkv, D, True)
        _try(rows, name, "litespark_triton", _litespark(causal=True), hf, fwd_flops, **base)
        _try(rows, name, "litespark_choice", _choice(), hf, fwd_flops, **base)
        del hf
        plain = _inputs(B, S, Hq, Hkv, D, False)
        _try(rows, name, "sdpa_flash", _sdpa_backend(SDPBackend.FLASH_ATTENTION), plain, fwd_flops, **base)
        _try(rows, name, "sdpa_cudnn", _sdpa_backend(SDPBackend.CUDNN_ATTENTION), plain, fwd_flops, **base)
        del plain
        torch.cuda.empty_cache()

    # Packed documents: each row holds 4 documents; attention stays inside each document.
    p = PACKED
    S, B, D, Hq, Hkv = p["S"], p["B"], p["D"], p["Hq"], p["Hkv"]
    segs = []
    for lens in p["docs"]:
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0)
        segs.append(segment_ids_from_cu_seqlens(cu, S)[0])
    seg = torch.stack(segs)
    pairs = sum(n * (n + 1) / 2 for lens in p["docs"] for n in lens)
    fwd_flops = 4 * pairs * Hq * D
    name = f"packed4 S{S} B{B} D{D} H{Hq}/{Hkv}"
    base = dict(S=S, B=B, D=D, Hq=Hq, Hkv=Hkv, causal=True, docs=p["docs"])
    _try(rows, name, "litespark_triton", _litespark(causal=True, q_segment_ids=seg, kv_segment_ids=seg),
         _inputs(B, S, Hq, Hkv, D, True), fwd_flops, **base)
    # The experimental segment-full blocks (LITESPARK_ATTN_SEGMENT_FULL): no segment mask inside a document.
    from litespark_kernels.ops import _attention_triton as at

    previous, at.SEGMENT_FULL_BLOCKS = at.SEGMENT_FULL_BLOCKS, True
    try:
        _try(rows, name, "litespark_segment_full",
             _litespark(causal=True, q_segment_ids=seg, kv_segment_ids=seg),
             _inputs(B, S, Hq, Hkv, D, True), fwd_flops, **base)
    finally:
        at.SEGMENT_FULL_BLOCKS = previous
    mask = visibility_mask(S, S, causal=True, q_segment_ids=seg, kv_segment_ids=seg, device="cuda")
    _try(rows, name, "sdpa_masked", _sdpa_masked(mask, Hq // Hkv), _inputs(B, S, Hq, Hkv, D, False), fwd_flops, **base)
    del mask
    _try(rows, name, "flex_attention", _flex(B, S, seg=seg), _inputs(B, S, Hq, Hkv, D, False), fwd_flops, **base)

    # Sliding window.
    w = WINDOW
    S, B, D, Hq, Hkv, W = w["S"], w["B"], w["D"], w["Hq"], w["Hkv"], w["window"]
    pairs = sum(min(i + 1, W) for i in range(S)) * B
    fwd_flops = 4 * pairs * Hq * D
    name = f"window{W} S{S} B{B} D{D} H{Hq}/{Hkv}"
    base = dict(S=S, B=B, D=D, Hq=Hq, Hkv=Hkv, causal=True, window=W)
    _try(rows, name, "litespark_triton", _litespark(causal=True, sliding_window=W),
         _inputs(B, S, Hq, Hkv, D, True), fwd_flops, **base)
    mask = visibility_mask(S, S, causal=True, sliding_window=W, device="cuda")
    _try(rows, name, "sdpa_masked", _sdpa_masked(mask, Hq // Hkv), _inputs(B, S, Hq, Hkv, D, False), fwd_flops, **base)
    del mask
    _try(rows, name, "flex_attention", _flex(B, S, window=W), _inputs(B, S, Hq, Hkv, D, False), fwd_flops, **base)

    # Attention logit soft-capping (Gemma-2), causal.
    from litespark_kernels.ops.attention import SUPPORTED_HEAD_DIMS, attention_reference

    c = SOFTCAP
    S, B, Hq, Hkv, cap = c["S"], c["B"], c["Hq"], c["Hkv"], c["softcap"]
    for D in c["head_dims"]:
        name = f"softcap{cap:g} S{S} B{B} D{D} H{Hq}/{Hkv}"
        fwd_flops = 4 * B * S * S * Hq * D / 2
        base = dict(S=S, B=B, D=D, Hq=Hq, Hkv=Hkv, causal=True, softcap=cap)
        if D in SUPPORTED_HEAD_DIMS:
            _try(rows, name, "litespark_softcap", _litespark(causal=True, softcap=cap),
                 _inputs(B, S, Hq, Hkv, D, True), fwd_flops, **base)
            _try(rows, name, "litespark_no_cap", _litespark(causal=True), _inputs(B, S, Hq, Hkv, D, True), fwd_flops,
                 **base)
        _try(rows, name, "reference_softcap", lambda q, k, v: attention_reference(q, k, v, causal=True, softcap=cap),
             _inputs(B, S, Hq, Hkv, D, True), fwd_flops, **base)
        _try(rows, name, "sdpa_flash_no_cap", _sdpa_backend(SDPBackend.FLASH_ATTENTION),
             _inputs(B, S, Hq, Hkv, D, False), fwd_flops, **base)
        torch.cuda.empty_cache()
    return rows


SWEEP_CANDIDATES = {  # (BLOCK_M, BLOCK_N, num_warps, num_stages, SPLIT) per kernel and head dim
    ("fwd", 64): [(128, 64, 8, 3, False), (128, 64, 8, 4, False), (128, 64, 8, 3, True), (128, 128, 8, 3, False)],
    ("fwd", 128): [(128, 128, 8, 3, False), (128, 64, 8, 3, True), (128, 128, 8, 3, True), (128, 64, 8, 4, False)],
    ("dkv", 64): [(64, 128, 8, 3, True), (32, 64, 4, 2, True), (32, 64, 4, 3, False), (64, 128, 8, 2, True),
                  (32, 128, 8, 3, True), (64, 64, 4, 2, False)],
    ("dkv", 128): [(32, 64, 4, 2, False), (32, 64, 4, 3, False), (32, 64, 4, 2, True), (32, 128, 8, 3, True),
                   (16, 64, 4, 2, False), (64, 64, 4, 2, False)],
    ("dq", 64): [(128, 64, 8, 3, False), (128, 64, 8, 4, False), (64, 64, 4, 2, False), (128, 64, 8, 3, True)],
    ("dq", 128): [(64, 32, 4, 3, False), (64, 32, 4, 2, False), (64, 64, 4, 2, False), (64, 32, 4, 3, True),
                  (128, 64, 8, 3, True)],
    ("fwd", 256): [(64, 64, 4, 2, False), (64, 64, 8, 2, False), (128, 64, 8, 2, False), (64, 32, 4, 3, False),
                   (128, 32, 8, 2, False), (64, 64, 4, 1, False)],
    ("dkv", 256): [(64, 64, 8, 1, False), (32, 64, 8, 2, False), (32, 64, 4, 2, False), (16, 64, 4, 2, False),
                   (32, 32, 4, 2, False), (64, 64, 8, 2, False)],
    ("dq", 256): [(64, 64, 8, 2, False), (64, 32, 4, 2, False), (64, 64, 4, 2, False), (128, 64, 8, 1, False),
                  (64, 32, 4, 3, False)],
}
SWEEP_SHAPES = [(4096, 4, 64, 32, 8), (4096, 4, 128, 24, 8), (2048, 4, 256, 8, 4)]  # the last: gemma2-1b's


def _sweep_case(shape, kind, cfg, time_it: bool):
    """Run (and optionally time) one kernel configuration on one shape; compiles it on first use."""
    from litespark_kernels.ops import _attention_triton as at

    S, B, D, Hq, Hkv = shape
    q, k, v, do = _inputs(B, S, Hq, Hkv, D, True, seed=1)
    q, k, v = q.detach(), k.detach(), v.detach()
    scale = D**-0.5
    saved = dict(at.CONFIGS)
    try:
        out, lse = at.attention_forward(q, k, v, scale, True, None, None)
        at.CONFIGS[(kind, D)] = cfg
        if kind == "fwd":
            fn = lambda: at.attention_forward(q, k, v, scale, True, None, None)  # noqa: E731
        else:
            fn = lambda: at.attention_backward(do, q, k, v, out, lse, scale, True, None, None)  # noqa: E731
        fn()
        torch.cuda.synchronize()
        return _bench(fn) if time_it else None
    finally:
        at.CONFIGS.clear()
        at.CONFIGS.update(saved)


def _compile_only(job):
    shape, kind, cfg = job
    try:
        _sweep_case(shape, kind, cfg, time_it=False)
        return None
    except Exception as e:  # reported again when timed
        return f"{type(e).__name__}: {str(e)[:100]}"


def sweep(head_dims=None) -> list[dict]:
    """Time each kernel's launch configurations (litespark_kernels.ops._attention_triton.CONFIGS) on SWEEP_SHAPES.

    The configurations are first compiled in parallel worker processes (filling Triton's on-disk cache), then
    timed one by one in this process. Backward rows time the whole backward (delta + dK/dV + dQ) with the other
    kernel at its current configuration."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(shape, kind, cfg) for shape in SWEEP_SHAPES if head_dims is None or shape[2] in head_dims
            for (kind, d), cands in SWEEP_CANDIDATES.items() if d == shape[2] for cfg in cands]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=min(12, os.cpu_count() or 4), mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile_only, jobs))
    print(f"  sweep: compiled {len(jobs)} configurations in {time.time() - t0:.0f} s", flush=True)
    rows = []
    for shape, kind, cfg in jobs:
        S, B, D, Hq, Hkv = shape
        try:
            ms = _sweep_case(shape, kind, cfg, time_it=True)
        except Exception as e:
            print(f"  sweep D{D} {kind} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            continue
        fwd_flops = 4 * B * S * S * Hq * D / 2
        flops = fwd_flops * (1.0 if kind == "fwd" else 2.5)
        rows.append(dict(D=D, S=S, B=B, Hq=Hq, kind=kind, config=cfg, ms=round(ms, 4),
                         tflops=round(flops / ms * 1e-9, 1)))
        print(f"  sweep D{D} {kind:3s} {cfg}: {ms:.3f} ms ({'fwd' if kind == 'fwd' else 'whole bwd'} "
              f"{rows[-1]['tflops']} TF/s)", flush=True)
    return rows


def _table(rows):
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| shape | " + " | ".join(f"{v} fwd+bwd" for v in variants) + " | "
             + " | ".join(f"{v} fwd" for v in variants) + " |",
             "|---" * (1 + 2 * len(variants)) + "|"]
    for s in shapes:
        cells = {r["variant"]: r for r in rows if r["shape"] == s}
        fb = [f"{cells[v]['fwd_bwd_tflops']}" if v in cells and "error" not in cells[v] else "-" for v in variants]
        fw = [f"{cells[v]['fwd_tflops']}" if v in cells and "error" not in cells[v] else "-" for v in variants]
        lines.append(f"| {s} | " + " | ".join(fb) + " | " + " | ".join(fw) + " |")
    return "\n".join(lines)


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    width = 0.8 / len(variants)
    for ax, key, title in ((axes[0], "fwd_bwd_tflops", "forward+backward"), (axes[1], "fwd_tflops", "forward")):
        for i, var in enumerate(variants):
            vals = []
            for s in shapes:
                r = next((r for r in rows if r["shape"] == s and r["variant"] == var and key in r), None)
                vals.append(r[key] if r else 0.0)
            ax.bar([x + i * width for x in range(len(shapes))], vals, width, label=var)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("TFLOP/s (FlashAttention convention)")
        ax.set_title(f"attention {title}, bf16, {torch.cuda.get_device_name()}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--sweep", action="store_true", help="also time the kernels' launch configurations")
    parser.add_argument("--sweep-dims", default=None,
                        help="comma-separated head dims the sweep covers (default: all of SWEEP_SHAPES)")
    parser.add_argument("--sweep-only", action="store_true", help="run the sweep alone (no benchmark rows)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import triton

    env = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               time=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(env, flush=True)
    result = dict(env=env)
    if args.sweep or args.sweep_only:
        dims = None if not args.sweep_dims else {int(d) for d in args.sweep_dims.split(",")}
        result["sweep"] = sweep(dims)
        if args.sweep_only:  # printed above; the result file keeps the benchmark rows
            return None
    rows = run()
    result["rows"] = rows
    from litespark_hf.efficiency.device import device_tag

    stem = os.path.join(args.out, f"attention_{device_tag(env['device'])}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    _plot([r for r in rows if "error" not in r], stem + ".png")
    print("\nTFLOP/s (" + env["device"] + ")\n" + _table(rows), flush=True)


if __name__ == "__main__":
    sys.exit(main())
