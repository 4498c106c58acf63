"""Where a training step's GPU time goes: torch.profiler over a window of Trainer steps, kernels grouped by kind.

Runs `litespark_hf.efficiency.bench.run_variant` (same model, data and settings as ``litespark-train-bench``) with
a profiler callback on steps ``--from``..``--to`` (1-based, inclusive), then prints per variant: wall time per
step, GPU busy time per step (union of kernel intervals), idle time, and milliseconds per step by kernel group
(GEMM, attention, fused linear CE, norms, RoPE, activations, optimizer, casts/copies, ...) plus the top kernels.
Writes ``<out>/profile_<config>_<device>.json`` (``profile_<config>_<engine>_<device>.json`` with ``--engine``) and, with ``--trace``, the Chrome traces.

Usage (GPU): ``python benchmarks/profile_step.py --config llama-1b --variants sdpa,litespark``
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys

GROUPS = [  # first match wins; patterns on the kernel name, lower case
    ("attention", r"_attn_|_bwd_delta|flash|fmha|cudnn.*attn|sdpa|_segment_range"),
    ("fused_ce", r"_ce_rows|cross_entropy|log_softmax|nll_loss"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|matmul|_mm_"),
    ("norm", r"rms|_ln_|layer_norm|norm_kernel"),
    ("rope", r"rope"),
    ("activation", r"_glu_|gelu|silu|swiglu"),
    ("optimizer", r"adam|multi_tensor|fused_sgd"),
    ("embedding", r"embedding|index_put|indexing_backward|index_select|scatter|gather|sort|radix"),
    ("reduce", r"reduce|norm"),
    ("cast_copy", r"copy|cast|convert|to_copy|cat_|fill|memset|memcpy"),
    ("elementwise", r"elementwise|vectorized|unrolled|pointwise|triton_"),
]


def group_of(name: str) -> str:
    low = name.lower()
    for g, pat in GROUPS:
        if re.search(pat, low):
            return g
    return "other"


def _union(intervals):
    total, end = 0.0, None
    start = None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                total += end - start
            start, end = s, e
        else:
            end = max(end, e)
    if end is not None:
        total += end - start
    return total


def analyse(trace_path: str, n_steps: int) -> dict:
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as fh:
        tr = json.load(fh)
    kern = [e for e in tr.get("traceEvents", []) if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
            and "dur" in e]
    if not kern:
        return {"error": "no kernel events in the trace"}
    iv = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in kern]
    span = max(e for _, e in iv) - min(s for s, _ in iv)
    busy = _union(iv)
    by_group, by_name, count = {}, {}, {}
    for e in kern:
        d = float(e["dur"])
        g = group_of(e["name"])
        by_group[g] = by_group.get(g, 0.0) + d
        by_name[e["name"]] = by_name.get(e["name"], 0.0) + d
        count[e["name"]] = count.get(e["name"], 0) + 1
    ms = 1e-3 / n_steps
    gaps = gap_summary(kern, ms)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:40]
    return {
        "steps": n_steps, "span_ms_per_step": span * ms, "busy_ms_per_step": busy * ms,
        "idle_ms_per_step": (span - busy) * ms, "kernels_per_step": len(kern) / n_steps,
        "groups_ms_per_step": {g: v * ms for g, v in sorted(by_group.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:140], "group": group_of(n), "ms_per_step": v * ms, "calls_per_step": count[n] / n_steps}
                        for n, v in top],
        "gaps": gaps,
    }


def host_syncs(trace_path: str) -> dict:
    """``{python call chain: count}`` for each device-to-host memcpy in a trace recorded with Python stacks."""
    with open(trace_path) as fh:
        ev = json.load(fh).get("traceEvents", [])
    copies = {e["args"].get("correlation") for e in ev if e.get("cat") == "gpu_memcpy" and "DtoH" in e.get("name", "")}
    runtime = [e for e in ev if e.get("cat") == "cuda_runtime" and e.get("args", {}).get("correlation") in copies]
    py = [e for e in ev if e.get("cat") == "python_function" and "dur" in e]
    out = {}
    for r in runtime:
        t, tid = float(r["ts"]), r.get("tid")
        frames = [e for e in py if e.get("tid") == tid and float(e["ts"]) <= t <= float(e["ts"]) + float(e["dur"])]
        frames.sort(key=lambda e: float(e["ts"]))
        names = [f["name"] for f in frames if "site-packages/torch/" not in f["name"] or "optim" in f["name"]]
        key = " <- ".join(n[-70:] for n in names[::-1][:6]) or r.get("name", "?")
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def gap_summary(kern: list, ms: float) -> dict:
    """Idle GPU time split by gap length, and summed by the kernel that ends each gap (what the GPU waited for)."""
    ev = sorted(kern, key=lambda e: float(e["ts"]))
    bins = {"<10us": 0.0, "10-100us": 0.0, "0.1-1ms": 0.0, ">1ms": 0.0}
    by_next, largest = {}, []
    end, prev = None, None
    for e in ev:
        s, d = float(e["ts"]), float(e["dur"])
        if end is not None and s > end:
            g = s - end
            bins["<10us" if g < 10 else "10-100us" if g < 100 else "0.1-1ms" if g < 1000 else ">1ms"] += g
            key = group_of(e["name"]) + ": " + e["name"][:60]
            by_next[key] = by_next.get(key, 0.0) + g
            largest.append((g, prev[:60], e["name"][:60]))
        if end is None or s + d > end:
            end, prev = s + d, e["name"]
    largest.sort(reverse=True)
    return {
        "idle_ms_per_step_by_gap_length": {k: v * ms for k, v in bins.items()},
        "idle_ms_per_step_before_kernel": {k: v * ms for k, v in sorted(by_next.items(), key=lambda kv: -kv[1])[:25]},
        "largest_gaps_us": [{"us": g, "after": a, "before": b} for g, a, b in largest[:20]],
    }


def profiler_callback(first: int, last: int, trace_path: str, cuda_only: bool = False, stack: bool = False):
    import torch
    from transformers import TrainerCallback

    class Prof(TrainerCallback):
        prof = None

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == first:
                torch.cuda.synchronize()
                acts = [torch.profiler.ProfilerActivity.CUDA]
                if not cuda_only:
                    acts.insert(0, torch.profiler.ProfilerActivity.CPU)
                self.prof = torch.profiler.profile(activities=acts, with_stack=stack and not cuda_only)
                self.prof.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self.prof is not None and state.global_step == last:
                torch.cuda.synchronize()
                self.prof.__exit__(None, None, None)
                self.prof.export_chrome_trace(trace_path)
                self.prof = None

    return Prof()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="llama-1b")
    p.add_argument("--variants", default="sdpa,litespark")
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--from", dest="first", type=int, default=6)
    p.add_argument("--to", dest="last", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--trace", action="store_true", help="keep the (gzipped) Chrome traces in --out")
    p.add_argument("--cuda-only", action="store_true",
                   help="record GPU activity only: host overhead is not inflated by CPU-op recording, so the idle "
                        "time is close to an unprofiled step's (no per-op attribution of the gaps)")
    p.add_argument("--engine", default="none", choices=("none", "fsdp2", "zero3"),
                   help="train under this sharding engine at world size 1 (as litespark-train-bench --engine)")
    p.add_argument("--syncs", action="store_true",
                   help="record Python stacks and list, for every device-to-host copy (a host sync), the Python "
                        "frames that issued it")
    a = p.parse_args(argv)
    from litespark_hf.efficiency.bench import run_variant

    os.makedirs(a.out, exist_ok=True)
    report = {}
    for v in a.variants.split(","):
        trace = os.path.join(a.out, f"trace_{a.config}_{v}.json")
        res = run_variant(a.config, v, a.steps, a.first, progress=False,
                          callbacks=[profiler_callback(a.first, a.last, trace, a.cuda_only, a.syncs)],
                          engine=a.engine)
        info = analyse(trace, a.last - a.first + 1)
        if a.syncs:
            info["syncs"] = host_syncs(trace)
            print(f"\n== {v}: device-to-host copies and the Python frames that issued them")
            for site, n in info["syncs"].items():
                print(f"   {n:4d}x  {site}")
        info["tokens_per_second_unprofiled_median"] = res.get("tokens_per_second")
        info["step_times_s"] = res.get("step_times_s")
        report[v] = info
        if a.trace:
            with open(trace, "rb") as fi, gzip.open(trace + ".gz", "wb") as fo:
                fo.write(fi.read())
        os.remove(trace)
        print(f"\n== {a.config} / {v}: span {info['span_ms_per_step']:.1f} ms/step, busy {info['busy_ms_per_step']:.1f}, "
              f"idle {info['idle_ms_per_step']:.1f}, {info['kernels_per_step']:.0f} kernels/step")
        for g, ms in info["groups_ms_per_step"].items():
            print(f"   {g:<12} {ms:8.2f} ms")
        gp = info.get("gaps", {})
        print("   idle by gap length (ms/step):", {k: round(v, 2) for k, v in gp.get("idle_ms_per_step_by_gap_length", {}).items()})
        print("   idle before kernel (ms/step):")
        for k, v in list(gp.get("idle_ms_per_step_before_kernel", {}).items())[:15]:
            print(f"   {v:7.2f}  {k}")
        print("   largest gaps:")
        for g in gp.get("largest_gaps_us", [])[:12]:
            print(f"   {g['us']:9.1f} us  after {g['after']}  before {g['before']}")
        print("   top kernels:")
        for k in info["top_kernels"][:25]:
            print(f"   {k['ms_per_step']:7.2f} ms {k['calls_per_step']:6.1f}x [{k['group']}] {k['name'][:100]}")
        sys.stdout.flush()
    from litespark_hf.efficiency.device import device_tag

    engine = f"{a.engine}_" if a.engine != "none" else ""
    path = os.path.join(a.out, f"profile_{a.config}_{engine}{device_tag()}.json")
    with open(path, "w") as fh:
        json.dump(report, fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
