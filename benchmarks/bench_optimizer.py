"""Benchmark of the optimizer step of a bf16-autocast training step with fp32 master weights.

The parameters of the Llama-3.2-1B shape (1,235.8M fp32 weights in 147 tensors: tied embedding, 16 layers of
q/k/v/o, gate/up/down and two norms, the final norm), random weights, gradients and moments. Variants, each the
work one training step needs between the backward and the next forward's matmuls:

- ``torch_fused+cast``: torch's fused AdamW (``fused=True``) with ``grad_scale`` (the folded clip), then
  `litespark_kernels.cast_weights` of the 112 projection weights to bf16 (what the Litespark forward did).
- ``torch_fused_noscale+cast``: the same without ``grad_scale`` (torch's kernel then does not write the gradients).
- ``torch_foreach+cast``: torch's default multi-tensor (foreach) AdamW, then the cast.
- ``litespark``: `LitesparkAdamW` with the cast shadow (writes the bf16 weights itself) and ``grad_scale``.
- ``litespark_noshadow``: `LitesparkAdamW` alone (no bf16 copies, no cast: the lower bound of the update).

Times: medians over ``--reps`` steps with CUDA events around each step: ``gpu_ms`` with a spin kernel queued
first, so that the host has launched the whole step before the GPU starts it (GPU work alone: in training the host
prepares the step while the GPU runs the backward), and ``ms`` without (host preparation included). Bandwidth:
minimum bytes per element (read p, g, m, v; write p, m, v; + bf16 copy for the projection weights) over gpu_ms.
Prints a table, writes ``optimizer_<device>.json`` and ``.png`` into ``--out``.

``python benchmarks/bench_optimizer.py [--reps 20] [--out benchmarks/results]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch


def llama_1b_shapes():
    h, inter, kv, layers, vocab = 2048, 8192, 512, 16, 128256
    shapes, proj = [(vocab, h)], []
    for _ in range(layers):
        layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)]
        proj.append(list(range(len(shapes), len(shapes) + 7)))
        shapes += layer + [(h,), (h,)]
    shapes.append((h,))
    return shapes, proj


def _elapsed_ms(step, spin: bool) -> float:
    """Milliseconds between CUDA events around one ``step()``. ``spin``: GPU time alone - a ~10 ms spin kernel
    first, so the host has queued the whole step before the GPU reaches it (as in training, where the host runs
    ahead during the backward); else host launch time included."""
    torch.cuda.synchronize()
    if spin:
        torch.cuda._sleep(20_000_000)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    step()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e)


def run(reps: int = 20, sweep: bool = False) -> list[dict]:
    from litespark_hf.optim import LitesparkAdamW
    from litespark_kernels import cast_weights
    from litespark_kernels.ops.linear import weight_views

    torch.manual_seed(0)
    shapes, proj = llama_1b_shapes()
    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    n_proj = sum(params[i].numel() for layer in proj for i in layer)
    # groups as the Llama forward uses them: q/k/v, o, gate/up, down
    groups = [[params[i] for i in idx] for layer in proj for idx in (layer[:3], [layer[3]], layer[4:6], [layer[6]])]

    class _Shadow:  # minimal CastShadow stand-in: the kernel only needs param -> bf16 view
        alive = True

        def __init__(self):
            views = cast_weights(groups, torch.bfloat16)
            self.param_views = dict(zip([w for g in groups for w in g], weight_views(views, groups)))

        def consistent(self):
            return True

        def stepped(self):
            pass

    scale = torch.tensor(1.3, device="cuda")
    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def torch_variant(fused: bool, with_scale: bool):
        opt = torch.optim.AdamW(params, fused=fused, foreach=not fused, **kw)

        def step():
            if with_scale:
                opt.grad_scale = scale
            opt.step()
            cast_weights(groups, torch.bfloat16)

        return step, opt

    def litespark_variant(shadow: bool):
        opt = LitesparkAdamW(params, **kw)
        if shadow:
            opt.shadow = _Shadow()

        def step():
            opt.grad_scale = scale
            opt.step()

        return step, opt

    variants = {
        "torch_fused+cast": lambda: torch_variant(True, True),
        "torch_fused_noscale+cast": lambda: torch_variant(True, False),
        "torch_foreach+cast": lambda: torch_variant(False, False),
        "litespark": lambda: litespark_variant(True),
        "litespark_noshadow": lambda: litespark_variant(False),
    }
    rows = []
    for name, make in variants.items():
        step, opt = make()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        times, gpu_times = [], []
        for _ in range(reps):
            times.append(_elapsed_ms(step, spin=False))
            gpu_times.append(_elapsed_ms(step, spin=True))
        ms = statistics.median(times)
        gpu_ms = statistics.median(gpu_times)
        shadow_bytes = 2 * n_proj if name != "litespark_noshadow" else 0
        nbytes = 28 * n + shadow_bytes
        rows.append({"variant": name, "ms": ms, "gpu_ms": gpu_ms, "min_bytes": nbytes, "gbps": nbytes / gpu_ms * 1e-6,
                     "params": n, "projection_params": n_proj})
        del opt, step
        torch.cuda.empty_cache()
    base = rows[0]["gpu_ms"]
    for r in rows:
        r["speedup_vs_torch_fused+cast"] = base / r["gpu_ms"]
    if sweep:
        rows += _sweep(params, _Shadow(), scale, kw, reps, n, n_proj, base)
    return rows


SWEEP = [(1024, 4), (1024, 8), (1024, 2), (512, 2), (512, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8)]


def _sweep(params, shadow, scale, kw, reps, n, n_proj, base) -> list[dict]:
    """GPU time of the AdamW kernel alone (with shadow and grad_scale) per launch configuration."""
    from litespark_kernels.ops._adamw_triton import adamw_step_triton

    grads = [p.grad for p in params]
    ms_, vs_ = [torch.zeros_like(p) for p in params], [torch.rand_like(p) * 1e-6 for p in params]
    shadows = [shadow.param_views.get(p) for p in params]
    rows = []
    for block, warps in SWEEP:
        cache = {}

        def step():
            adamw_step_triton(params, grads, ms_, vs_, lr=kw["lr"], beta1=kw["betas"][0], beta2=kw["betas"][1],
                              eps=kw["eps"], weight_decay=kw["weight_decay"], step=3, grad_scale=scale,
                              shadows=shadows, cache=cache, block=block, num_warps=warps)

        for _ in range(3):
            step()
        gpu_ms = statistics.median(_elapsed_ms(step, spin=True) for _ in range(reps))
        nbytes = 28 * n + 2 * n_proj
        name = f"kernel BLOCK={block} warps={warps}"
        rows.append({"variant": name, "ms": gpu_ms, "gpu_ms": gpu_ms, "min_bytes": nbytes,
                     "gbps": nbytes / gpu_ms * 1e-6, "params": n, "projection_params": n_proj,
                     "speedup_vs_torch_fused+cast": base / gpu_ms, "sweep": True})
        print(f"  {name}: {gpu_ms:.3f} ms, {nbytes / gpu_ms * 1e-6:.0f} GB/s", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| variant | GPU ms | ms with host | GB/s (minimum bytes, GPU ms) | speed-up (GPU) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['gpu_ms']:.2f} | {r['ms']:.2f} | {r['gbps']:.0f} | "
                     f"{r['speedup_vs_torch_fused+cast']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh([r["variant"] for r in rows], [r["gpu_ms"] for r in rows], color="tab:blue")
    for i, r in enumerate(rows):
        ax.text(r["gpu_ms"], i, f" {r['gpu_ms']:.2f} ms ({r['gbps']:.0f} GB/s)", va="center")
    ax.set_xlabel("ms per optimizer step (Llama-3.2-1B parameters, fp32 + bf16 copies)")
    ax.invert_yaxis()
    ax.set_xlim(0, max(r["gpu_ms"] for r in rows) * 1.35)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--sweep", action="store_true", help="also time the AdamW kernel's launch configurations")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_optimizer needs a CUDA GPU")
        return 1
    rows = run(args.reps, args.sweep)
    print(table(rows))
    from litespark_hf.efficiency.device import device_tag

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"optimizer_{device_tag()}")
    with open(stem + ".json", "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, fh, indent=1)
    plot(rows, stem + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
