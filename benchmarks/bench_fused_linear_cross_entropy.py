"""Benchmark: LM head + causal-LM cross-entropy, forward + backward, on one GPU.

Shape: Llama-3 vocabulary (128256), hidden 2048, 8192 tokens, bf16 inputs, weight and hidden requiring grad.
Variants:
- unfused: transformers' path, ``F.linear`` (bf16 logits) -> ``.float()`` -> ``cross_entropy`` (the reference);
- liger: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (chunked; bf16 weight-gradient accumulation);
- litespark: ``fused_linear_cross_entropy_triton`` with its defaults, and with logits chunks of 256 / 512 / 1024 MiB
  and fp32 or bf16 accumulation of the weight gradient, to show the trade-offs.
``components()`` times each step of litespark's chunk loop (GEMMs, the Triton CE kernel) for several chunk sizes.
Scenarios: every label valid (pre-training), and half the labels ignored (-100, as in SFT).

Time: ``triton.testing.do_bench`` median of one forward+backward (gradients reset to None each call).
Memory: ``torch.cuda.max_memory_allocated`` during one forward+backward, minus the memory allocated before it
(inputs): this includes the gradients themselves (grad_W: 0.49 GiB in bf16, grad_hidden: 32 MiB).

``run() -> list[dict]``; ``python benchmarks/bench_fused_linear_cross_entropy.py [--out DIR]`` also prints a table
and writes ``fused_linear_cross_entropy_<device>.json``, ``.png`` and
``fused_linear_cross_entropy_components_<device>.json`` to DIR (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[1]

NAME = "fused_linear_cross_entropy"


def _variants():
    from litespark_kernels.ops._fused_linear_cross_entropy_triton import fused_linear_cross_entropy_triton

    def unfused(h, w, target):
        logits = F.linear(h, w).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), target, ignore_index=-100)

    def litespark(**options):
        def fn(h, w, target):
            return fused_linear_cross_entropy_triton(h, w, shift_labels=target, _options=options)
        return fn

    out = [("unfused (F.linear -> .float() -> cross_entropy)", unfused)]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
        out.append(("liger FusedLinearCrossEntropy", lambda h, w, target: liger_loss(w, h, target)))
    except Exception as exc:  # noqa: BLE001 - reported in the table
        out.append((f"liger (unavailable: {type(exc).__name__}: {exc})", None))
    out.append(("litespark (default: 512 MiB chunks, fp32 grad_W acc)", litespark()))
    for mib in (256, 1024):
        out.append((f"litespark ({mib} MiB chunks, fp32 grad_W acc)", litespark(chunk_bytes=mib * 2**20)))
    for mib in (256, 512):
        out.append((f"litespark ({mib} MiB chunks, bf16 grad_W acc)",
                    litespark(chunk_bytes=mib * 2**20, accum_dtype=torch.bfloat16)))
    return out


def components(vocab: int = 128256, tokens: int = 8192, hidden: int = 2048, dtype: torch.dtype = torch.bfloat16,
               chunk_rows=(1024, 2048, 4096)) -> list[dict]:
    """Time of each step of litespark's chunk loop, scaled to all ``tokens`` (chunks of ``rows`` rows)."""
    import triton

    from litespark_kernels.ops import _fused_linear_cross_entropy_triton as impl

    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(1)
    w = (0.02 * torch.randn(vocab, hidden, device=device, generator=g)).to(dtype)
    fused = impl._addmm_fp32_supported(device)
    out = []
    for rows in chunk_rows:
        h = torch.randn(rows, hidden, device=device, generator=g).to(dtype)
        t = torch.randint(0, vocab, (rows,), device=device, generator=g)
        logits = torch.empty(rows, vocab, device=device, dtype=dtype)
        loss = torch.empty(rows, device=device)
        scale = torch.full((1,), 1.0 / tokens, device=device)
        acc32 = torch.zeros(vocab, hidden, device=device)
        acc16 = torch.zeros(vocab, hidden, device=device, dtype=dtype)
        gh = torch.empty(rows, hidden, device=device, dtype=dtype)

        def ce():
            torch.mm(h, w.t(), out=logits)  # fresh logits each time (the kernel overwrites them)
            impl._launch_ce_rows(logits, t, loss, scale, -100, True)

        steps = {
            "logits = h @ W^T": lambda: torch.mm(h, w.t(), out=logits),
            "logits GEMM + CE kernel": ce,
            "grad_hidden = dlogits @ W": lambda: torch.mm(logits, w, out=gh),
            f"grad_W += dlogits^T @ h (fp32 acc, fused={fused})":
                lambda: impl._accumulate_mm(acc32, logits.t(), h, fused),
            "grad_W += dlogits^T @ h (bf16 acc)": lambda: impl._accumulate_mm(acc16, logits.t(), h, False),
        }
        n_chunks = tokens / rows
        times = {}
        for name, fn in steps.items():
            times[name] = triton.testing.do_bench(fn, warmup=50, rep=200, return_mode="median") * n_chunks
        times["CE kernel (derived)"] = times.pop("logits GEMM + CE kernel") - times["logits = h @ W^T"]
        for name, ms in times.items():
            ms = max(ms, 1e-6)
            gemm_flops = 2.0 * tokens * hidden * vocab
            out.append({"op": NAME, "component": name, "chunk_rows": rows, "ms_all_tokens": ms,
                        "tflops": gemm_flops / (ms * 1e-3) / 1e12 if "CE kernel" not in name else None,
                        "gb_per_s": 3 * tokens * vocab * 2 / (ms * 1e-3) / 1e9 if "CE kernel" in name else None,
                        "device": torch.cuda.get_device_name()})
        del h, t, logits, loss, acc32, acc16, gh
        torch.cuda.empty_cache()
    return out


def run(vocab: int = 128256, tokens: int = 8192, hidden: int = 2048, dtype: torch.dtype = torch.bfloat16,
        ignored_fracs=(0.0, 0.5)) -> list[dict]:
    import triton

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=g).to(dtype).requires_grad_(True)
    w = (0.02 * torch.randn(vocab, hidden, device=device, generator=g)).to(dtype).requires_grad_(True)
    flops = 6.0 * tokens * hidden * vocab  # three GEMMs: logits, grad_hidden, grad_weight
    results = []
    for frac in ignored_fracs:
        target = torch.randint(0, vocab, (tokens,), device=device, generator=g)
        target[torch.rand(tokens, device=device, generator=g) < frac] = -100
        ref_loss = None
        for name, fn in _variants():
            if frac > 0 and "MiB chunks" in name and "default" not in name:
                continue
            row = {"op": NAME, "variant": name, "tokens": tokens, "hidden": hidden, "vocab": vocab,
                   "dtype": str(dtype).replace("torch.", ""), "ignored_frac": frac,
                   "device": torch.cuda.get_device_name()}
            if fn is None:
                results.append(row)
                continue

            def step():
                h.grad = None
                w.grad = None
                loss = fn(h, w, target)
                loss.backward()
                return loss

            try:
                loss = step()  # warm-up / compile
                torch.cuda.synchronize()
                h.grad = None
                w.grad = None
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                loss = step()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                loss_val = loss.item()
                ms = triton.testing.do_bench(step, warmup=100, rep=500, return_mode="median")
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: reported in the table
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                results.append(row)
                h.grad = None
                w.grad = None
                torch.cuda.empty_cache()
                continue
            if ref_loss is None:
                ref_loss = loss_val
            n_items = int((target != -100).sum())
            row.update({
                "ms": ms, "peak_mem_gib": peak / 2**30, "loss": loss_val, "loss_diff_vs_unfused": loss_val - ref_loss,
                "n_items": n_items,
                "tflops_dense_equiv": flops / (ms * 1e-3) / 1e12,
            })
            results.append(row)
            h.grad = None
            w.grad = None
            torch.cuda.empty_cache()
    return results


def print_table(results: list[dict]) -> str:
    lines = [f"{'ignored':>7} | {'variant':<52} | {'ms':>7} | {'dense-eq TFLOP/s':>16} | {'peak GiB':>8} | {'dloss':>9}",
             "-" * 112]
    for r in results:
        if "ms" not in r:
            lines.append(f"{r['ignored_frac']:>7.2f} | {r['variant'][:52]:<52} | {r.get('error', 'n/a')}")
            continue
        lines.append(f"{r['ignored_frac']:>7.2f} | {r['variant'][:52]:<52} | {r['ms']:7.2f} | "
                     f"{r['tflops_dense_equiv']:16.1f} | {r['peak_mem_gib']:8.2f} | {r['loss_diff_vs_unfused']:9.2e}")
    text = "\n".join(lines)
    print(text)
    return text


def save(results: list[dict], out: str | os.PathLike) -> None:
    from litespark_hf.efficiency.device import device_tag

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{NAME}_{device_tag()}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "ms" in r]
    labels = [f"{r['variant'].split(' (')[0]}{' ' + r['variant'].split(' (')[1].rstrip(')') if 'litespark' in r['variant'] else ''}"
              f"\nignored={r['ignored_frac']:.1f}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.6 * len(rows) + 2))
    axes[0].barh(range(len(rows)), [r["ms"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("forward + backward (ms, median)")
    axes[1].barh(range(len(rows)), [r["peak_mem_gib"] for r in rows], color="tab:orange")
    axes[1].set_xlabel("peak memory above inputs (GiB)")
    for ax in axes:
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
    if rows:
        fig.suptitle(f"LM head + cross-entropy: {rows[0]['tokens']} tokens, hidden {rows[0]['hidden']}, "
                     f"vocab {rows[0]['vocab']}, {rows[0]['dtype']} ({rows[0]['device']})")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(_ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    results = run()
    parts = components()
    print("\nlitespark chunk-loop components, summed over all tokens (ms):")
    for c in parts:
        extra = f"{c['tflops']:.0f} TFLOP/s" if c["tflops"] else f"{c['gb_per_s']:.0f} GB/s (3 passes)"
        print(f"  rows {c['chunk_rows']:5d} | {c['component']:<52} | {c['ms_all_tokens']:7.2f} | {extra}")
    print()
    print_table(results)
    save(results, args.out)
    from litespark_hf.efficiency.device import device_tag

    (Path(args.out) / f"{NAME}_components_{device_tag()}.json").write_text(json.dumps(parts, indent=2))


if __name__ == "__main__":
    main()
