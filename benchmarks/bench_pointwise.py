"""Benchmark of the memory-bound kernels: RMSNorm, fused add+RMSNorm, LayerNorm, RoPE, SwiGLU, GELU-tanh+bias.

bf16, forward and forward+backward, litespark's Triton kernels against the PyTorch eager reference, Liger-Kernel's
op where Liger has one, and (``with_compile=True``) torch.compile of the reference. Achieved bandwidth counts each
input read once and each output written once (the minimum any implementation must move; ``_bytes`` lists them per
op) and is reported as a fraction of a device-to-device copy measured in the same run (bytes read + bytes written).

Two times per row, both medians with L2 flushed before every call:
- ``ms`` (GPU time, the headline): each call is preceded on the stream by the L2 flush and a ~2 ms spin kernel, so
  the CPU has queued the whole call before the GPU reaches it and the interval between the two events is GPU work
  alone, as in a training step where the CPU runs ahead of the GPU.
- ``ms_with_launch``: ``triton.testing.do_bench`` as is (only the flush before each call): when a call's CPU-side
  cost (Python, autograd, launches) exceeds the flush's GPU time, this includes it.

Run through ``benchmarks/run_kernel_benchmarks.py`` or alone: ``python benchmarks/bench_pointwise.py [--sweep]``
(writes ``pointwise_<device>.json`` and ``.png`` to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

GROUP = "pointwise"
DTYPE = torch.bfloat16

# (op, case parameters, also time torch.compile). Rows = tokens: 8192 = 4 x 2048, as in the project's baselines.
# torch.compile is timed on one case per op (each shape and mode is a separate, slow compilation).
CASES = [
    ("rms_norm", dict(rows=8192, hidden=2048), False),
    ("rms_norm", dict(rows=16384, hidden=2048), False),
    ("rms_norm", dict(rows=32768, hidden=2048), False),
    ("rms_norm", dict(rows=8192, hidden=4096), False),
    ("rms_norm", dict(rows=16384, hidden=4096), True),
    ("rms_norm", dict(rows=32768, hidden=4096), False),
    ("add_rms_norm", dict(rows=16384, hidden=2048), False),
    ("add_rms_norm", dict(rows=16384, hidden=4096), True),
    ("layer_norm", dict(rows=16384, hidden=3072), True),
    ("rope", dict(B=4, S=2048, Hq=32, Hkv=8, D=64), True),
    ("swiglu", dict(rows=8192, hidden=8192), True),
    ("gelu_tanh_bias", dict(rows=8192, hidden=12288), True),
]


def _case_name(op: str, p: dict) -> str:
    if op == "rope":
        return f"B{p['B']} S{p['S']} H{p['Hq']}/{p['Hkv']} D{p['D']}"
    return f"{p['rows']}x{p['hidden']}"


def _bytes(op: str, p: dict, mode: str) -> int:
    """Minimum bytes moved: each input read once, each output written once (bf16 = 2 bytes; fp32 statistics)."""
    e = 2
    if op == "rope":
        qk = p["B"] * p["S"] * (p["Hq"] + p["Hkv"]) * p["D"] * e
        cs = 2 * p["S"] * p["D"] * e
        one = 2 * qk + cs  # read q, k, cos, sin; write q, k (same in the backward)
        return one if mode == "fwd" else 2 * one
    M, N = p["rows"], p["hidden"]
    t = M * N * e
    fwd, bwd = {
        "rms_norm": (2 * t + N * e + 4 * M, 3 * t + 2 * N * e + 4 * M),  # x -> y, rstd | dy, x, w, rstd -> dx, dw
        "add_rms_norm": (4 * t + N * e + 4 * M, 4 * t + 2 * N * e + 4 * M),  # x, r -> y, s | dy, ds, s -> dx(=dr)
        "layer_norm": (2 * t + 2 * N * e + 8 * M, 3 * t + 3 * N * e + 8 * M),
        "swiglu": (3 * t, 5 * t),  # g, u -> y | dy, g, u -> dg, du
        "gelu_tanh_bias": (2 * t + N * e, 3 * t + 2 * N * e),  # x, b -> y | dy, x, b -> dx, db
    }[op]
    return fwd if mode == "fwd" else fwd + bwd


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(n_bytes // 2, device="cuda", dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = _gpu_time(lambda: dst.copy_(src), reps=50)
    del src, dst
    return 2 * n_bytes / ms * 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Inputs and providers
# ---------------------------------------------------------------------------------------------------------------


def _inputs(op: str, p: dict, requires_grad: bool, gen: torch.Generator):
    def rnd(*shape, scale=1.0, shift=0.0):
        return (scale * torch.randn(*shape, device="cuda", generator=gen) + shift).to(DTYPE)

    if op == "rope":
        B, S, Hq, Hkv, D = p["B"], p["S"], p["Hq"], p["Hkv"], p["D"]
        qb = rnd(B, S, Hq, D).requires_grad_(requires_grad)
        kb = rnd(B, S, Hkv, D).requires_grad_(requires_grad)
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device="cuda", dtype=torch.float32) / D))
        freqs = torch.arange(S, device="cuda", dtype=torch.float32)[:, None] * inv
        emb = torch.cat((freqs, freqs), -1)[None]
        # the transposed views the attention layers hand over; leaves are the [B, S, H, D] buffers
        return dict(leaves=(qb, kb), args=(qb.transpose(1, 2), kb.transpose(1, 2), emb.cos().to(DTYPE),
                                            emb.sin().to(DTYPE)))
    M, N = p["rows"], p["hidden"]
    if op == "rms_norm":
        x, w = rnd(M, N), rnd(N, scale=0.1, shift=1.0)
        leaves = (x, w)
        args = (x, w, 1e-6)
    elif op == "add_rms_norm":
        x, r, w = rnd(M, N), rnd(M, N), rnd(N, scale=0.1, shift=1.0)
        leaves = (x, r, w)
        args = (x, r, w, 1e-6)
    elif op == "layer_norm":
        x, w, b = rnd(M, N, shift=0.3), rnd(N, scale=0.1, shift=1.0), rnd(N, scale=0.1)
        leaves = (x, w, b)
        args = (x, w, b, 1e-5)
    elif op == "swiglu":
        g, u = rnd(M, N, scale=2.0), rnd(M, N)
        leaves = (g, u)
        args = (g, u)
    elif op == "gelu_tanh_bias":
        x, b = rnd(M, N, scale=2.0), rnd(N, scale=0.5)
        leaves = (x, b)
        args = (x, b)
    else:
        raise ValueError(op)
    for t in leaves:
        t.requires_grad_(requires_grad)
    return dict(leaves=leaves, args=args)


def _providers(op: str, with_compile: bool) -> dict:
    import litespark_kernels as lk
    from litespark_kernels.ops import _activations_triton as act_t
    from litespark_kernels.ops import _layer_norm_triton as ln_t
    from litespark_kernels.ops import _rms_norm_triton as rms_t
    from litespark_kernels.ops import _rope_triton as rope_t
    from litespark_kernels.ops.activations import gelu_tanh_bias_reference, swiglu_reference
    from litespark_kernels.ops.rms_norm import add_rms_norm_reference

    ours = {
        "rms_norm": rms_t.rms_norm_triton,
        "add_rms_norm": rms_t.add_rms_norm_triton,
        "layer_norm": ln_t.layer_norm_triton,
        "rope": rope_t.apply_rope_triton,
        "swiglu": act_t.swiglu_triton,
        "gelu_tanh_bias": act_t.gelu_tanh_bias_triton,
    }[op]
    eager = {
        "rms_norm": lk.rms_norm_reference,
        "add_rms_norm": add_rms_norm_reference,
        "layer_norm": lambda x, w, b, eps: F.layer_norm(x, (x.shape[-1],), w, b, eps),
        "rope": lk.apply_rope_reference,
        "swiglu": swiglu_reference,
        "gelu_tanh_bias": gelu_tanh_bias_reference,
    }[op]
    out = {"litespark": ours, "eager": eager}
    try:
        liger = _liger(op)
    except Exception as e:  # noqa: BLE001 - Liger missing or broken: reported, not fatal
        print(f"  liger {op}: unavailable ({type(e).__name__}: {e})", flush=True)
        liger = None
    if liger is not None:
        out["liger"] = liger
    if with_compile:
        out["torch.compile"] = torch.compile(eager, dynamic=False)
    return out


def _liger(op: str):
    if op == "rms_norm":
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        return lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
    if op == "add_rms_norm":
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        return lambda x, r, w, eps: LigerFusedAddRMSNormFunction.apply(x, r, w, eps)
    if op == "layer_norm":
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction

        return lambda x, w, b, eps: LigerLayerNormFunction.apply(x, w, b, eps)
    if op == "rope":
        from liger_kernel.ops.rope import LigerRopeFunction

        return lambda q, k, cos, sin: LigerRopeFunction.apply(q, k, cos, sin)  # rotates q and k in place
    if op == "swiglu":
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return lambda g, u: LigerSiLUMulFunction.apply(g, u)
    return None  # no GELU-tanh+bias in Liger


def _timed_fn(fn, inp: dict, mode: str, gen: torch.Generator):
    args, leaves = inp["args"], inp["leaves"]
    if mode == "fwd":
        return lambda: fn(*args)
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    grads = tuple(torch.randn(o.shape, device="cuda", generator=gen).to(o.dtype) for o in outs)

    def fwd_bwd():
        o = fn(*args)
        o = o if isinstance(o, tuple) else (o,)
        return torch.autograd.grad(o, leaves, grads)

    return fwd_bwd


_FLUSH = None


def _gpu_time(fn, reps: int | None = None, spin_cycles: int = 4_000_000) -> float:
    """Median GPU time (ms) of fn() with L2 flushed and the launch cost hidden behind a spin kernel."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    if reps is None:  # ~100 ms of measured work, 10-100 calls
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(3):
            fn()
        e.record()
        torch.cuda.synchronize()
        reps = int(max(10, min(100, 100.0 / max(s.elapsed_time(e) / 3, 1e-3))))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        _FLUSH.zero_()
        torch.cuda._sleep(spin_cycles)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends))
    return times[len(times) // 2]


def _bench_with_launch(fn, rep_ms: int = 100) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def run(with_compile: bool = False, copy_gbps: float | None = None, sweep: bool = False,
        compile_budget_s: float = 90.0) -> list[dict]:
    """One row per (op, case, mode, provider): ms, GB/s and fraction of the measured copy bandwidth.

    torch.compile rows stop being added once ``compile_budget_s`` seconds have passed (compilation is slow)."""
    import time

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    t_start = time.time()
    copy_gbps = copy_gbps or copy_bandwidth()
    device = torch.cuda.get_device_name()
    print(f"  device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows: list[dict] = [dict(group=GROUP, op="copy", case="1 GiB", mode="-", provider="torch copy_",
                             gbps=round(copy_gbps, 1), frac_copy=1.0, device=device)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    if with_compile:  # every case is a new shape: allow the recompilations
        import torch._dynamo as dynamo

        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, 64)
    for op, p, compile_case in CASES:
        compile_now = with_compile and compile_case and time.time() - t_start < compile_budget_s
        if with_compile and compile_case and not compile_now:
            print(f"  {op}: torch.compile skipped (past the {compile_budget_s:.0f} s compile budget)", flush=True)
        providers = _providers(op, compile_now)
        for mode in ("fwd", "fwd+bwd"):
            inp = _inputs(op, p, requires_grad=(mode != "fwd"), gen=gen)
            nbytes = _bytes(op, p, mode)
            for name, fn in providers.items():
                row = dict(group=GROUP, op=op, case=_case_name(op, p), mode=mode, provider=name, device=device,
                           dtype="bfloat16", bytes=nbytes)
                try:
                    timed = _timed_fn(fn, inp, mode, gen)
                    ms = _gpu_time(timed)
                    ms_launch = _bench_with_launch(timed)
                except Exception as e:  # noqa: BLE001 - a provider that fails is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                    print(f"  {op} {row['case']} {mode} {name}: {row['error']}", flush=True)
                    rows.append(row)
                    continue
                gbps = nbytes / ms * 1e-6
                row.update(ms=round(ms, 4), gbps=round(gbps, 1), frac_copy=round(gbps / copy_gbps, 3),
                           ms_with_launch=round(ms_launch, 4))
                rows.append(row)
                print(f"  {op:15s} {row['case']:24s} {mode:8s} {name:14s} {ms:8.4f} ms {gbps:7.0f} GB/s "
                      f"{gbps / copy_gbps:6.1%}  (with launch {ms_launch:.4f} ms)", flush=True)
            del inp
        torch.cuda.empty_cache()
    _add_speedups(rows)
    if sweep:
        try:
            rows += run_sweep(copy_gbps)
        except Exception as e:  # noqa: BLE001 - the sweep is advisory; keep the main rows
            print(f"  sweep failed: {type(e).__name__}: {e}", flush=True)
    return rows


def _add_speedups(rows: list[dict]) -> None:
    """litespark's speed-up over each other provider, on litespark's rows (e.g. speedup_vs_eager)."""
    by_key = {}
    for r in rows:
        if "ms" in r:
            by_key.setdefault((r["op"], r["case"], r["mode"]), {})[r["provider"]] = r
    for provs in by_key.values():
        ours = provs.get("litespark")
        if ours is None:
            continue
        for name, r in provs.items():
            if name != "litespark":
                ours[f"speedup_vs_{name}"] = round(r["ms"] / ours["ms"], 2)


# ---------------------------------------------------------------------------------------------------------------
# Launch-configuration sweep (raw launchers, no autograd): informs the defaults in the kernel files.
# ---------------------------------------------------------------------------------------------------------------


def run_sweep(copy_gbps: float) -> list[dict]:
    """GPU time of launch configurations of the raw launchers (no autograd); informs the kernels' defaults."""
    from litespark_kernels.ops import _activations_triton as act_t
    from litespark_kernels.ops import _layer_norm_triton as ln_t
    from litespark_kernels.ops import _rms_norm_triton as rms_t
    from litespark_kernels.ops import _rope_triton as rope_t

    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []

    def rec(op, case, kernel, cfg, nbytes, fn):
        try:
            ms = _gpu_time(fn, reps=30)
        except Exception as e:  # noqa: BLE001
            print(f"  sweep {op} {case} {kernel} {cfg}: {type(e).__name__}: {str(e)[:100]}", flush=True)
            return
        gbps = nbytes / ms * 1e-6
        rows.append(dict(group=GROUP + "_sweep", op=op, case=case, mode=kernel, provider=str(cfg),
                         ms=round(ms, 4), gbps=round(gbps, 1), frac_copy=round(gbps / copy_gbps, 3)))
        print(f"  sweep {op:10s} {case:12s} {kernel:4s} {str(cfg):50s} {ms:8.4f} ms {gbps / copy_gbps:6.1%}",
              flush=True)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=gen)).to(DTYPE)

    for N in (2048, 4096):
        M = 16384
        x, w = r(M, N), r(N, scale=0.1) + 1
        t = M * N * 2
        _, _, rstd = rms_t.rms_norm_forward(x, None, w, 1e-6)
        dy = r(M, N)
        rec("rms_norm", f"{M}x{N}", "fwd", "default", 2 * t, lambda: rms_t.rms_norm_forward(x, None, w, 1e-6))
        for nw, ps in ((4, 8), (4, 16), (8, 2), (8, 4), (16, 1), (16, 2), (32, 1)):
            rec("rms_norm", f"{M}x{N}", "bwd", dict(num_warps=nw, per_sm=ps), 3 * t,
                lambda nw=nw, ps=ps: rms_t.rms_norm_backward(dy, None, x, w, rstd, num_warps=nw,
                                                             programs_per_sm=ps))
        del x, dy
    M, N = 16384, 3072
    x, w, b = r(M, N), r(N) + 1, r(N)
    _, mean, rstd = ln_t.layer_norm_forward(x, w, b, 1e-5)
    dy = r(M, N)
    t = M * N * 2
    for bm, nw in ((1, 4), (1, 8), (2, 8)):
        rec("layer_norm", f"{M}x{N}", "fwd", dict(block_m=bm, num_warps=nw), 2 * t,
            lambda bm=bm, nw=nw: ln_t.layer_norm_forward(x, w, b, 1e-5, block_m=bm, num_warps=nw))
    for nw, ps in ((4, 8), (8, 2), (8, 4), (16, 1), (16, 2), (32, 1)):
        rec("layer_norm", f"{M}x{N}", "bwd", dict(num_warps=nw, per_sm=ps), 3 * t,
            lambda nw=nw, ps=ps: ln_t.layer_norm_backward(dy, x, w, True, mean, rstd, num_warps=nw,
                                                          programs_per_sm=ps))
    del x, dy
    B, S, Hq, Hkv, D = 4, 2048, 32, 8, 64
    q, k = r(B, S, Hq, D).transpose(1, 2), r(B, S, Hkv, D).transpose(1, 2)
    cos, sin = r(1, S, D), r(1, S, D)
    nb = 2 * (q.numel() + k.numel()) * 2
    for bs, nw in ((1, 2), (1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8), (16, 16)):
        rec("rope", f"S{S}", "fwd", dict(block_s=bs, num_warps=nw), nb,
            lambda bs=bs, nw=nw: rope_t.rope_launch(q, k, cos, sin, False, block_s=bs, num_warps=nw))
    del q, k
    M, N = 8192, 12288
    x, bias, dy = r(M, N), r(N), r(M, N)
    t = M * N * 2
    for tile, bn, nw, ps in ((4096, 1024, 8, 4), (4096, 1024, 8, 8), (2048, 1024, 4, 8), (2048, 1024, 4, 16)):
        cfg = dict(tile=tile, block_n=bn, num_warps=nw)
        rec("gelu_bias", f"{M}x{N}", "bwd", dict(cfg, per_sm=ps), 3 * t,
            lambda c=cfg, ps=ps: act_t.gelu_bias_backward(dy, x, bias, programs_per_sm=ps, **c))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Table and plot
# ---------------------------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = ["| op | case | mode | provider | GPU ms | GB/s | of copy | speed-up vs eager | vs liger | vs compile |"
             " ms incl. launch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("group") != GROUP or r["op"] == "copy":
            continue
        if "error" in r:
            lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['provider']} | error: {r['error'][:60]} |"
                         " | | | | | |")
            continue
        lines.append(f"| {r['op']} | {r['case']} | {r['mode']} | {r['provider']} | {r['ms']:.4f} | {r['gbps']:.0f} |"
                     f" {r['frac_copy']:.1%} | {r.get('speedup_vs_eager', '')} | {r.get('speedup_vs_liger', '')} |"
                     f" {r.get('speedup_vs_torch.compile', '')} | {r.get('ms_with_launch', '')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("group") == GROUP and "ms" in r and r["op"] != "copy"]
    if not rows:
        return
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(14, 9))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        sub = [r for r in rows if r["mode"] == mode]
        cases = list(dict.fromkeys(f"{r['op']}\n{r['case']}" for r in sub))
        width = 0.8 / len(providers)
        for i, prov in enumerate(providers):
            vals = {f"{r['op']}\n{r['case']}": r["frac_copy"] for r in sub if r["provider"] == prov}
            xs = [j + i * width for j, c in enumerate(cases) if c in vals]
            ax.bar(xs, [100 * vals[c] for c in cases if c in vals], width, label=prov)
        ax.axhline(85, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels(cases, fontsize=7)
        ax.set_ylabel("% of measured copy bandwidth")
        ax.set_title(f"{mode}, bf16, {rows[0].get('device', '')}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the references")
    parser.add_argument("--sweep", action="store_true", help="also time launch configurations")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rows = run(with_compile=args.compile, sweep=args.sweep)
    from litespark_hf.efficiency.device import device_tag

    stem = os.path.join(args.out, f"pointwise_{device_tag()}")
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    plot(rows, stem + ".png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
