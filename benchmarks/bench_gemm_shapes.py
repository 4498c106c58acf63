"""The GEMMs of one decoder layer at training shapes: bf16 (cuBLAS) per projection, fused QKV / gate+up, and fp8.

For a Llama-style layer (``--tokens`` rows, ``--hidden``, ``--inter``, ``--heads``/``--kv-heads`` x ``--head-dim``)
times forward (x W^T), grad-input (dy W) and grad-weight (dy^T x) for each projection, separately and fused, and
the same GEMMs as fp8 e4m3 ``torch._scaled_mm`` with tensor-wise scales (inputs already quantised and laid out; the
quantisation passes are not included). Prints a table, writes JSON. Needs a GPU.
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None):
    import torch
    from triton.testing import do_bench

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/gemm_shapes_<device>.json)")
    a = p.parse_args(argv)
    if a.out is None:
        from litespark_hf.efficiency.device import device_tag

        a.out = f"benchmarks/results/gemm_shapes_{device_tag()}.json"
    M, H, I = a.tokens, a.hidden, a.inter
    q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
    projs = {"q": (q, H), "k": (kv, H), "v": (kv, H), "o": (H, q), "gate": (I, H), "up": (I, H), "down": (H, I),
             "qkv_fused": (q + 2 * kv, H), "gate_up_fused": (2 * I, H)}
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    fp8 = getattr(torch, "float8_e4m3fn", None)
    one = torch.ones((), device=dev)
    rows = []
    for name, (N, K) in projs.items():
        x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
        dy = torch.randn(M, N, device=dev, generator=g, dtype=torch.bfloat16)
        flop = 2 * M * N * K
        t = {
            "fwd": do_bench(lambda: x @ w.t()),
            "dgrad": do_bench(lambda: dy @ w),
            "wgrad": do_bench(lambda: dy.t() @ x),
        }
        r = {"proj": name, "N": N, "K": K, **{f"bf16_{k}_ms": v for k, v in t.items()},
             **{f"bf16_{k}_tflops": flop / v / 1e9 for k, v in t.items()}}
        if fp8 is not None:
            try:
                x8, w8, dy8 = x.to(fp8), w.to(fp8), dy.to(fp8)
                wt8 = w.t().contiguous().to(fp8)  # [K, N] row-major: its .t() is the column-major [N, K]
                dyt8, xt8 = dy.t().contiguous().to(fp8), x.t().contiguous().to(fp8)
                mm = torch._scaled_mm
                t8 = {
                    "fwd": do_bench(lambda: mm(x8, w8.t(), one, one, out_dtype=torch.bfloat16)),
                    "dgrad": do_bench(lambda: mm(dy8, wt8.t(), one, one, out_dtype=torch.bfloat16)),
                    "wgrad": do_bench(lambda: mm(dyt8, xt8.t(), one, one, out_dtype=torch.float32)),
                }
                r.update({f"fp8_{k}_ms": v for k, v in t8.items()})
                r.update({f"fp8_{k}_tflops": flop / v / 1e9 for k, v in t8.items()})
            except Exception as exc:  # noqa: BLE001
                r["fp8_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(r)
        print(f"{name:>14} N={N:>6} K={K:>5} | bf16 fwd {r['bf16_fwd_tflops']:5.0f} dgrad {r['bf16_dgrad_tflops']:5.0f} "
              f"wgrad {r['bf16_wgrad_tflops']:5.0f} TFLOP/s | "
              + (f"fp8 fwd {r['fp8_fwd_tflops']:5.0f} dgrad {r['fp8_dgrad_tflops']:5.0f} wgrad {r['fp8_wgrad_tflops']:5.0f}"
                 if "fp8_fwd_tflops" in r else r.get("fp8_error", "no fp8")), flush=True)
    by = {r["proj"]: r for r in rows}

    def layer(keys, prefix):
        return sum(by[k][f"{prefix}_{s}_ms"] for k in keys for s in ("fwd", "dgrad", "wgrad") if f"{prefix}_{s}_ms" in by[k])

    sep = ["q", "k", "v", "o", "gate", "up", "down"]
    fused = ["qkv_fused", "o", "gate_up_fused", "down"]
    summary = {"bf16_separate_ms": layer(sep, "bf16"), "bf16_fused_ms": layer(fused, "bf16")}
    if "fp8_fwd_ms" in by["q"]:
        summary.update(fp8_separate_ms=layer(sep, "fp8"), fp8_fused_ms=layer(fused, "fp8"))
    print("per layer, fwd+bwd GEMMs:", {k: round(v, 3) for k, v in summary.items()})
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": vars(a), "rows": rows,
                   "per_layer": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
