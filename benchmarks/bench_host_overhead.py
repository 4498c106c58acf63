"""Host (CPU) time per training step, where the GPU has almost nothing to do: is a step launch-bound?

Runs the 1B-shaped model of ``litespark-train-bench`` (random init, fp32 weights, bf16 autocast) on a tiny batch
(``--batch`` x ``--seq``, default 1 x 16 tokens) so that the GPU work is negligible and the wall time of a forward,
and of forward + backward, is the time the CPU needs to issue it. Compares stock sdpa with Litespark, and Litespark
with its Triton launch shortcut (`litespark_kernels._launch`) against Triton's own launch path
(``LITESPARK_FAST_LAUNCH=0``). Also times single ops (Litespark dispatcher vs the eager PyTorch equivalent) on tiny
tensors, and with ``--breakdown`` each layer of one RMSNorm call, both launch paths. Prints tables, writes JSON and
a PNG next to it. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _time(fn, reps: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3  # ms


def breakdown(reps: int) -> dict:
    """Host microseconds per call of each layer under one RMSNorm forward (16 x 2048 fp32 rows)."""
    import torch
    import torch.nn.functional as F
    import triton

    import litespark_kernels as lk
    from litespark_kernels import _dispatch
    from litespark_kernels.ops import _rms_norm_triton as rt

    d = torch.device("cuda")
    x = torch.randn(16, 2048, device=d)
    w = torch.randn(2048, device=d)
    xg = x.clone().requires_grad_(True)
    wg = w.clone().requires_grad_(True)
    y = torch.empty_like(x)
    rstd = torch.empty(16, device=d)
    bm, bn, nw = rt._fwd_config(2048, None, None)
    grid = (triton.cdiv(16, bm),)
    args = (x, x, y, y, w, rstd, x.stride(0), 0, 0, y.stride(0), 16, 2048, 1e-5, 0.0)

    from litespark_hf.efficiency.bench import temporary_env
    from litespark_kernels._launch import FastLauncher

    kernel = rt._rms_fwd_kernel  # the JITFunction under the shortcut
    kernel = kernel.fn if isinstance(kernel, FastLauncher) else kernel

    def raw():
        return kernel[grid](*args, HAS_RESIDUAL=False, HAS_OFFSET=False, BLOCK_M=bm, BLOCK_N=bn, num_warps=nw)

    def fast():
        return rt._rms_fwd_kernel[grid](*args, HAS_RESIDUAL=False, HAS_OFFSET=False, BLOCK_M=bm, BLOCK_N=bn,
                                        num_warps=nw)

    class Nop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    layers = {
        "torch.add (eager reference)": lambda: torch.add(x, x),
        "F.rms_norm (eager)": lambda: F.rms_norm(x, (2048,), w, 1e-5),
        "torch.empty x2": lambda: (torch.empty_like(x), torch.empty(16, device=d)),
        "no-op autograd.Function": lambda: Nop.apply(xg),
        "use_triton check": lambda: _dispatch.use_triton("rms_norm", x, w),
        "raw Triton launch kernel[grid](...)": raw,
        "launch shortcut (FastLauncher)": fast,
    }
    paths = {}  # layer -> LITESPARK_FAST_LAUNCH while it is timed
    for path, flag in (("Triton launch", "0"), ("shortcut", "1")):
        for name, fn in ((f"rms_norm_forward (launcher + allocs), {path}",
                          lambda: rt.rms_norm_forward(x, None, w, 1e-5)),
                         (f"rms_norm_triton (autograd.Function), {path}", lambda: rt.rms_norm_triton(xg, wg, 1e-5)),
                         (f"lk.rms_norm (dispatcher, grad), {path}", lambda: lk.rms_norm(xg, wg, 1e-5))):
            layers[name], paths[name] = fn, flag
    try:
        ck = raw()
        run = ck[(grid[0], 1, 1)]
        full = args + (False, False, bm, bn)
        run(*full)
        layers["compiled kernel run (cached, no binder)"] = lambda: run(*full)
    except Exception as e:  # the compiled-kernel API differs between Triton versions
        print("compiled-kernel launch not timed:", type(e).__name__, e)
    out = {}
    print(f"{'layer':>58} | host us per call")
    for name, fn in layers.items():
        with temporary_env("LITESPARK_FAST_LAUNCH", paths.get(name)):
            out[name] = _time(fn, reps) * 1e3
        print(f"{name:>58} | {out[name]:8.2f}", flush=True)
    return out


def plot(res: dict, path: str) -> None:
    """Bars: host ms per forward / forward+backward per model variant, and host us per layer of the breakdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("model", "host ms per call (tiny batch)")] + ([("breakdown_us", "host us per call")]
                                                           if res.get("breakdown_us") else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        if key == "model":
            names = list(res["model"])
            for j, part in enumerate(("forward_ms", "forward_backward_ms")):
                vals = [res["model"][n][part] for n in names]
                ax.barh([i + 0.4 * j for i in range(len(names))], vals, height=0.4, label=part)
            ax.set_yticks([i + 0.2 for i in range(len(names))], names)
            ax.legend()
        else:
            names = list(res[key])
            ax.barh(range(len(names)), [res[key][n] for n in names])
            ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    import litespark_hf
    import litespark_kernels as lk
    from litespark_hf.efficiency.bench import CONFIGS, _hf_config, temporary_env

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama-1b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the model timings (the fastest is reported)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/host_overhead_<device>.json)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time each layer of one RMSNorm call (dispatcher, autograd.Function, launcher, raw "
                        "Triton launch, compiled-kernel launch) to see where an op's host time goes")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (it times the host's work of launching GPU kernels)")
    if a.out is None:
        from litespark_hf.efficiency.device import device_tag

        a.out = f"benchmarks/results/host_overhead_{device_tag()}.json"
    cfg = CONFIGS[a.config]
    hf = _hf_config(cfg)
    res = {"model": {}, "ops": {}}
    ids = torch.randint(0, hf.vocab_size, (a.batch, a.seq), device="cuda")
    # One model per kind; the two launch paths share the Litespark model and alternate for --rounds rounds (the
    # host is noisy: each figure is the fastest round's mean over --reps calls).
    timings: dict[str, dict[str, list[float]]] = {}
    for kind in ("sdpa", "litespark"):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(hf, attn_implementation="sdpa", dtype=torch.float32)
        if kind == "litespark":
            litespark_hf.apply(model)
        model.train()

        def fwd():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(input_ids=ids, labels=ids).loss

        def fwd_bwd():
            fwd().backward()

        names = {"sdpa": (("sdpa", "1"),), "litespark": (("litespark", "1"), ("litespark_triton_launch", "0"))}[kind]
        for _ in range(a.rounds):
            for name, flag in names:
                t = timings.setdefault(name, {"forward_ms": [], "forward_backward_ms": []})
                with temporary_env("LITESPARK_FAST_LAUNCH", flag):
                    t["forward_ms"].append(_time(fwd, a.reps))
                    t["forward_backward_ms"].append(_time(fwd_bwd, a.reps))
        del model
        torch.cuda.empty_cache()
    for name, t in timings.items():
        r = res["model"][name] = {k: min(v) for k, v in t.items()} | {f"{k}_rounds": v for k, v in t.items()}
        print(f"{name:>24}: forward {r['forward_ms']:.2f} ms, forward+backward {r['forward_backward_ms']:.2f} ms "
              f"(fastest of {a.rounds} rounds; CPU-bound: {a.batch}x{a.seq} tokens)", flush=True)
    from litespark_kernels import _launch

    res["launch_stats"] = {n: dict(lc.stats) for n, lc in _launch.launchers().items() if lc.stats["triton"]}

    d = torch.device("cuda")
    x = torch.randn(16, 2048, device=d, requires_grad=True)
    w = torch.ones(2048, device=d, requires_grad=True)
    q = torch.randn(1, 32, 16, 64, device=d, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 8, 16, 64, device=d, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 8, 16, 64, device=d, dtype=torch.bfloat16, requires_grad=True)
    cos = torch.randn(1, 16, 64, device=d)
    sin = torch.randn(1, 16, 64, device=d)
    gu = torch.randn(16, 2 * 1024, device=d, dtype=torch.bfloat16, requires_grad=True)
    ws = [torch.randn(n, 2048, device=d, requires_grad=True) for n in (2048, 512, 512)]

    def autocast(fn):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fn()
        return run

    ops = {
        "rms_norm": (lambda: lk.rms_norm(x, w, 1e-5), lambda: F.rms_norm(x, (2048,), w, 1e-5)),
        "rope": (lambda: lk.apply_rope(q, k, cos, sin), lambda: lk.apply_rope_reference(q, k, cos, sin)),
        "attention": (lambda: lk.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True),
                      lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "swiglu_packed": (lambda: lk.swiglu_packed(gu), lambda: F.silu(gu[:, :1024]) * gu[:, 1024:]),
        "qkv_projection": (autocast(lambda: lk.fused_linear(x, ws)), autocast(lambda: [F.linear(x, t) for t in ws])),
    }
    print(f"{'op':>16} | litespark fwd | eager fwd | litespark fwd+bwd | eager fwd+bwd   (ms per call, host-bound)")
    for name, (ours, eager) in ops.items():
        def fb(fn):
            def run():
                out = fn()
                outs = out if isinstance(out, (list, tuple)) else [out]
                torch.autograd.backward([o.float().sum() for o in outs])
            return run
        r = {"litespark_fwd": _time(ours, a.reps * 5), "eager_fwd": _time(eager, a.reps * 5),
             "litespark_fwd_bwd": _time(fb(ours), a.reps * 5), "eager_fwd_bwd": _time(fb(eager), a.reps * 5)}
        res["ops"][name] = r
        print(f"{name:>16} | {r['litespark_fwd']:13.3f} | {r['eager_fwd']:9.3f} | {r['litespark_fwd_bwd']:17.3f} | "
              f"{r['eager_fwd_bwd']:13.3f}", flush=True)
    if a.breakdown:
        res["breakdown_us"] = breakdown(a.reps * 50)
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "args": vars(a), **res}, fh, indent=1)
    plot(res, os.path.splitext(a.out)[0] + ".png")
    print("wrote", a.out, "and", os.path.splitext(a.out)[0] + ".png")


if __name__ == "__main__":
    main()
