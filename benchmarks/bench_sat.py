"""SAT benchmark: training step time and tokens/s at omission rates 0 / 0.25 / 0.5 on the Llama-3.2-1B shape, plus
an MLP-only microbenchmark (forward + backward of one gated MLP at the selected channels).

Run on the device machine (one run, one GPU):
    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/bench_sat.py --out $OUT
Prints tables and writes bench_sat.json + bench_sat.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

PEAK = 989e12  # H100/H200 dense bf16 datasheet


def mlp_micro(tokens=8192, hidden=2048, inter=8192, rates=(0.0, 0.25, 0.5)):
    import triton.testing

    from litespark_kernels.sparse_mlp import sparse_gated_mlp

    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    wg = (torch.randn(inter, hidden, device=dev) * 0.02).bfloat16().requires_grad_()
    wu = (torch.randn(inter, hidden, device=dev) * 0.02).bfloat16().requires_grad_()
    wd = (torch.randn(hidden, inter, device=dev) * 0.02).bfloat16().requires_grad_()
    go = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    rows = []
    base = None
    for rate in rates:
        index = None if rate == 0 else torch.randperm(inter, device=dev)[: inter - int(round(rate * inter))].sort().values

        def step():
            out = sparse_gated_mlp(x, wg, wu, wd, index)
            out.backward(go)

        def stock():
            out = torch.nn.functional.linear(
                torch.nn.functional.silu(torch.nn.functional.linear(x, wg)) * torch.nn.functional.linear(x, wu), wd)
            out.backward(go)

        ms = triton.testing.do_bench(step, warmup=50, rep=300, grad_to_none=[x, wg, wu, wd])
        if rate == 0:
            stock_ms = triton.testing.do_bench(stock, warmup=50, rep=300, grad_to_none=[x, wg, wu, wd])
            rows.append({"rate": 0.0, "variant": "stock MLP (silu*up)", "ms": stock_ms, "speedup": 1.0,
                         "ideal": 1.0, "tflops": 6 * 3 * tokens * hidden * inter / stock_ms / 1e9})
            base = stock_ms
        k = inter - int(round(rate * inter))
        rows.append({"rate": rate, "variant": "SAT sparse_gated_mlp", "ms": ms, "speedup": base / ms,
                     "ideal": 1 / (1 - rate), "tflops": 6 * 3 * tokens * hidden * k / ms / 1e9})
    return rows


def e2e(variants, steps=10, warmup=3, seq=2048, batch=4):
    from transformers import AutoConfig, AutoModelForCausalLM

    from litespark_hf.sat import disable_sat, enable_sat, executed_flops_per_token, frozen_omitted, sat_step

    cfg = AutoConfig.for_model(
        "llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5, use_cache=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, r_mlp, r_heads in variants:
        if name == "dense (no SAT)":
            disable_sat(model)
        else:
            enable_sat(model, sat_omission_rate_mlp=r_mlp, sat_omission_rate_heads=r_heads, sat_schedule="constant",
                       sat_exempt_layers="", sat_refresh_interval=0)
        times = []
        torch.cuda.reset_peak_memory_stats()
        for s in range(warmup + steps):
            ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sat_step(model, s, warmup + steps)  # step 0: dense refresh (importance of every unit)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            with frozen_omitted(model, opt):
                opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if s >= warmup:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        executed, dense = executed_flops_per_token(model, seq)
        tps = batch * seq / med
        rows.append({"variant": name, "rate_mlp": r_mlp, "rate_heads": r_heads, "step_ms": med * 1e3,
                     "tokens_per_s": tps, "executed_flops_fraction": executed / dense,
                     "mfu_executed": executed * tps / PEAK, "mfu_dense_equivalent": dense * tps / PEAK,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)})
        print(rows[-1], flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    micro = mlp_micro()
    print(f"\nMLP fwd+bwd, tokens 8192, hidden 2048, intermediate 8192, bf16, {dev}")
    print(f"{'variant':26s} {'rate':>5s} {'ms':>8s} {'speedup':>8s} {'ideal':>6s} {'TFLOP/s':>8s}")
    for r in micro:
        print(f"{r['variant']:26s} {r['rate']:5.2f} {r['ms']:8.3f} {r['speedup']:8.2f} {r['ideal']:6.2f} "
              f"{r['tflops']:8.1f}")
    variants = [("dense (no SAT)", 0.0, 0.0), ("SAT 0 / 0", 0.0, 0.0), ("SAT 0.25 / 0.25", 0.25, 0.25),
                ("SAT 0.5 / 0.5", 0.5, 0.5), ("SAT 0.5 MLP only", 0.5, 0.0)]
    rows = e2e(variants, steps=args.steps)
    print(f"\nLlama-3.2-1B shape, seq 2048, batch 4, bf16 autocast + fp32 AdamW (fused), sdpa, {dev}")
    print(f"{'variant':18s} {'step ms':>8s} {'tok/s':>8s} {'speedup':>8s} {'exec FLOPs':>10s} "
          f"{'MFU exec':>9s} {'MFU dense-eq':>12s} {'mem GiB':>8s}")
    for r in rows:
        print(f"{r['variant']:18s} {r['step_ms']:8.1f} {r['tokens_per_s']:8.0f} {r['speedup']:8.2f} "
              f"{r['executed_flops_fraction']:10.3f} {r['mfu_executed']:9.1%} {r['mfu_dense_equivalent']:12.1%} "
              f"{r['peak_mem_gib']:8.1f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_sat.json"), "w") as f:
        json.dump({"device": dev, "mlp_micro": micro, "e2e": rows}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sat_micro = [r for r in micro if r["variant"].startswith("SAT")]
    axes[0].plot([r["rate"] for r in sat_micro], [r["speedup"] for r in sat_micro], "o-", label="measured")
    axes[0].plot([r["rate"] for r in sat_micro], [r["ideal"] for r in sat_micro], "k--", label="1/(1-rate)")
    axes[0].set(xlabel="MLP omission rate", ylabel="speedup vs stock MLP", title="MLP fwd+bwd")
    axes[0].legend()
    axes[1].bar([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows])
    axes[1].set(ylabel="tokens/s", title="Llama-3.2-1B shape training step")
    axes[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "bench_sat.png"), dpi=120)


if __name__ == "__main__":
    main()
