"""SAT benchmark: training step time and tokens/s at omission rates 0 / 0.25 / 0.5 on the Llama-3.2-1B shape, plus
an MLP-only microbenchmark (forward + backward of one gated MLP at the selected channels).

Run on the device machine (one run, one GPU):
    PYTHONPATH=$PWD/kernels:$PWD python benchmarks/bench_sat.py --out $OUT [--profile]
With a copy of the pre-change SAT package under ``build/sat_legacy/sat_legacy`` (``--legacy-dir``), the "before:"
rows time it in the same process.
Prints tables and writes bench_sat_<device>.json + .png to --out.
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

    from litespark_kernels.ops.sparse_mlp import sparse_gated_mlp

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


def _legacy_sat(legacy_dir):
    """The SAT code as it stood before the end-to-end work (a copy under ``legacy_dir``, loaded as
    ``litespark_hf.sat_legacy``), to time before/after in one process; None when absent."""
    if not legacy_dir or not os.path.isdir(os.path.join(legacy_dir, "sat_legacy")):
        return None
    import importlib

    import litespark_hf

    litespark_hf.__path__.append(legacy_dir)
    return importlib.import_module("litespark_hf.sat_legacy")


def _build(seq):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_theta=500000.0, rms_norm_eps=1e-5, use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, fused=True)
    return cfg, model, opt


def e2e(variants, legacy=None, steps=10, warmup=3, seq=2048, batch=4, profile_dir=None):
    """Time full training steps. ``variants``: (name, impl, rate_mlp, rate_heads, freeze); impl is "dense" (SAT
    off), "new" (litespark_hf.sat) or "legacy". Per step, CUDA events split the GPU time into select (sat_step),
    forward, backward and optimizer (incl. the freeze); host time of each phase is taken too."""
    import litespark_hf.sat as new_sat

    cfg, model, opt = _build(seq)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    active = None
    for name, impl, r_mlp, r_heads, freeze in variants:
        if active is not None:
            active.disable_sat(model)
            active = None
        if impl != "dense":
            active = legacy if impl == "legacy" else new_sat
            if active is None:
                continue
            active.enable_sat(model, sat_omission_rate_mlp=r_mlp, sat_omission_rate_heads=r_heads,
                              sat_schedule="constant", sat_exempt_layers="", sat_refresh_interval=0,
                              sat_freeze_omitted=freeze)
        times, phases_gpu, phases_host = [], [], []
        torch.cuda.reset_peak_memory_stats()

        def one_step(s, ids):
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
            h = [time.perf_counter()]
            ev[0].record()
            if active is not None:
                active.sat_step(model, s, warmup + steps)  # step 0: dense importance refresh
            ev[1].record()
            h.append(time.perf_counter())
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            ev[2].record()
            h.append(time.perf_counter())
            loss.backward()
            ev[3].record()
            h.append(time.perf_counter())
            if active is not None and freeze:
                with active.frozen_omitted(model, opt):
                    opt.step()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            ev[4].record()
            h.append(time.perf_counter())
            return loss, ev, h

        for s in range(warmup + steps):
            ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss, ev, h = one_step(s, ids)
            torch.cuda.synchronize()
            if s >= warmup:
                times.append(time.perf_counter() - t0)
                phases_gpu.append([ev[i].elapsed_time(ev[i + 1]) for i in range(4)])
                phases_host.append([(h[i + 1] - h[i]) * 1e3 for i in range(4)])
        if profile_dir and impl != "dense" and r_mlp == 0.5 and r_heads == 0.5 and freeze:
            from torch.profiler import ProfilerActivity, profile

            ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda", generator=g)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                one_step(warmup + steps, ids)
                torch.cuda.synchronize()
            ka = prof.key_averages()
            with open(os.path.join(profile_dir, f"profile_{impl}_0.5.txt"), "w") as f:
                for key in ("self_device_time_total", "self_cuda_time_total"):
                    try:
                        f.write(ka.table(sort_by=key, row_limit=40, max_name_column_width=70))
                        break
                    except Exception as e:  # older/newer key names
                        f.write(f"[{key}: {e}]\n")
            print(f"profile of {name} written", flush=True)
        med = statistics.median(times)
        ctrl_mod = active if active is not None else new_sat
        executed, dense = ctrl_mod.executed_flops_per_token(model, seq)
        tps = batch * seq / med
        pg = [statistics.median(c) for c in zip(*phases_gpu)]
        ph = [statistics.median(c) for c in zip(*phases_host)]
        rows.append({"variant": name, "impl": impl, "freeze": freeze, "rate_mlp": r_mlp, "rate_heads": r_heads,
                     "step_ms": med * 1e3, "tokens_per_s": tps, "executed_flops_fraction": executed / dense,
                     "mfu_executed": executed * tps / PEAK, "mfu_dense_equivalent": dense * tps / PEAK,
                     "gpu_ms_select_fwd_bwd_opt": pg, "host_ms_select_fwd_bwd_opt": ph,
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss)})
        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    if active is not None:
        active.disable_sat(model)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / base
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--legacy-dir", default="build/sat_legacy",
                    help="folder holding a copy of the pre-change SAT package as sat_legacy/ (before/after timing)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one 0.5 step per implementation")
    ap.add_argument("--skip-micro", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    micro = [] if args.skip_micro else mlp_micro()
    if micro:
        print(f"\nMLP fwd+bwd, tokens 8192, hidden 2048, intermediate 8192, bf16, {dev}")
        print(f"{'variant':26s} {'rate':>5s} {'ms':>8s} {'speedup':>8s} {'ideal':>6s} {'TFLOP/s':>8s}")
        for r in micro:
            print(f"{r['variant']:26s} {r['rate']:5.2f} {r['ms']:8.3f} {r['speedup']:8.2f} {r['ideal']:6.2f} "
                  f"{r['tflops']:8.1f}")
    legacy = _legacy_sat(args.legacy_dir)
    variants = [("dense (no SAT)", "dense", 0.0, 0.0, True), ("SAT 0 / 0", "new", 0.0, 0.0, True)]
    for r in (0.25, 0.5):
        variants += [(f"SAT {r} / {r}", "new", r, r, True), (f"SAT {r} / {r} no-freeze", "new", r, r, False)]
        if legacy is not None:
            variants += [(f"before: SAT {r} / {r}", "legacy", r, r, True),
                         (f"before: SAT {r} / {r} no-freeze", "legacy", r, r, False)]
    variants += [("SAT 0.5 MLP only", "new", 0.5, 0.0, True)]
    rows = e2e(variants, legacy=legacy, steps=args.steps, profile_dir=args.out if args.profile else None)
    print(f"\nLlama-3.2-1B shape, seq 2048, batch 4, bf16 autocast + fp32 AdamW (fused), sdpa, {dev}")
    print(f"{'variant':30s} {'step ms':>8s} {'tok/s':>8s} {'speedup':>8s} {'exec FLOPs':>10s} "
          f"{'MFU exec':>9s} {'MFU dense-eq':>12s} {'mem GiB':>8s}  GPU ms select/fwd/bwd/opt  host ms")
    for r in rows:
        pg = "/".join(f"{v:.1f}" for v in r["gpu_ms_select_fwd_bwd_opt"])
        ph = "/".join(f"{v:.1f}" for v in r["host_ms_select_fwd_bwd_opt"])
        print(f"{r['variant']:30s} {r['step_ms']:8.1f} {r['tokens_per_s']:8.0f} {r['speedup']:8.2f} "
              f"{r['executed_flops_fraction']:10.3f} {r['mfu_executed']:9.1%} {r['mfu_dense_equivalent']:12.1%} "
              f"{r['peak_mem_gib']:8.1f}  {pg}  {ph}")
    from litespark_hf.efficiency.device import device_tag

    stem = os.path.join(args.out, f"bench_sat_{device_tag(dev)}")
    with open(stem + ".json", "w") as f:
        json.dump({"device": dev, "torch": torch.__version__, "mlp_micro": micro, "e2e": rows}, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    sat_micro = [r for r in micro if r["variant"].startswith("SAT")]
    if sat_micro:
        axes[0].plot([r["rate"] for r in sat_micro], [r["speedup"] for r in sat_micro], "o-", label="measured")
        axes[0].plot([r["rate"] for r in sat_micro], [r["ideal"] for r in sat_micro], "k--", label="1/(1-rate)")
        axes[0].set(xlabel="MLP omission rate", ylabel="speedup vs stock MLP", title="MLP fwd+bwd")
        axes[0].legend()
    axes[1].barh([r["variant"] for r in rows], [r["tokens_per_s"] for r in rows],
                 color=["C1" if r["impl"] == "legacy" else "C0" for r in rows])
    axes[1].set(xlabel="tokens/s", title=f"Llama-3.2-1B shape training step ({dev})")
    axes[1].invert_yaxis()
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=120)


if __name__ == "__main__":
    main()
