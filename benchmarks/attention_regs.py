"""Register and stack use of the attention kernels, compiled offline for a GPU target (no GPU needed).

For sessions without a device: Triton compiles ``_attention_triton``'s forward, dK/dV and dQ kernels for the target
(default sm_90, Hopper) with the launch configurations the kernels would use there (``CONFIGS``), and ``cuobjdump
-res-usage`` (shipped with Triton's CUDA backend) reads each cubin's registers per thread and stack bytes (spills).
A change that adds spills to a kernel is worth knowing before the GPU run; the numbers are the local Triton's
(the GPU machines may run another version: benchmarks/NOTES.md, "Attention", saw 3.9 report spills where 3.6 ran
well), so compare variants with each other, not across versions.

    python benchmarks/attention_regs.py [--dims 64,128] [--seg-full both] [--arch 90]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

KERNELS = ("fwd", "dkv", "dq")


def _signature(fn, constexprs: dict) -> dict:
    """Triton types of the kernel's arguments: the attention kernels' naming (upper-case names are tensors: bf16
    q/k/v/o and their gradients, fp32 LSE / DELTA, int32 segment ids and ranges)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("LSE", "DELTA"):
            sig[name] = "*fp32"
        elif name.startswith("SEG") or name.endswith("SEG"):
            sig[name] = "*i32"
        elif name.isupper() and name != "G":
            sig[name] = "*bf16"
        elif name in ("qk_scale", "tanh_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _res_usage(cubin: bytes) -> tuple[int, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no REG/STACK line: {out[-300:]!r}")
    return int(m.group(1)), int(m.group(2))


def compile_one(kind: str, head_dim: int, *, has_seg: bool, seg_full: bool, arch: int = 90) -> dict:
    """Compile one attention kernel for ``sm_<arch>``; returns its configuration, registers and stack bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from litespark_kernels.ops import _attention_triton as at

    kernel = {"fwd": at._attn_fwd_kernel, "dkv": at._attn_bwd_dkv_kernel, "dq": at._attn_bwd_dq_kernel}[kind]
    fn = kernel
    while not hasattr(fn, "arg_names"):  # through the launch shortcut's wrapper to the JITFunction
        fn = fn.fn
    if not hasattr(fn, "cache_key"):
        raise SystemExit("attention_regs: the kernels were imported under TRITON_INTERPRET=1; run without it")
    block_d = max(16, triton.next_power_of_2(head_dim))
    key = (kind, 64 if block_d <= 64 else 128 if block_d <= 128 else 256)
    bm, bn, warps, stages, split = at.CONFIGS[key]
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, SPLIT=split, CAUSAL=True,
                      WINDOW=False, HAS_SEG=has_seg, SOFTCAP=False, SEG_FULL=has_seg and seg_full)
    src = ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 64),
                              options=dict(num_warps=warps, num_stages=stages))
    regs, stack = _res_usage(compiled.asm["cubin"])
    return dict(kernel=kind, head_dim=head_dim, has_seg=has_seg, seg_full=has_seg and seg_full,
                config=f"{bm}x{bn} w{warps} s{stages}{' split' if split else ''}", regs=regs, stack_bytes=stack)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="64,128", help="head dims, comma-separated (default 64,128)")
    p.add_argument("--kernels", default=",".join(KERNELS), help="fwd, dkv, dq (default all)")
    p.add_argument("--seg-full", choices=("off", "on", "both"), default="both",
                   help="segment-id variants: without segment ids, with them, with them and SEGMENT_FULL_BLOCKS")
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default 90)")
    a = p.parse_args(argv)
    kinds = [k.strip() for k in a.kernels.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KERNELS]
    if bad:
        p.error(f"--kernels: unknown {bad}; choose from {', '.join(KERNELS)}")
    dims = [int(d) for d in a.dims.split(",") if d.strip()]
    variants = [(False, False), (True, False)] if a.seg_full == "off" else (
        [(True, True)] if a.seg_full == "on" else [(False, False), (True, False), (True, True)])
    os.environ.pop("TRITON_INTERPRET", None)
    print("| kernel | head dim | segment ids | segment-full | config | registers | stack (B) |")
    print("|---|---|---|---|---|---|---|")
    for kind in kinds:
        for d in dims:
            for has_seg, full in variants:
                r = compile_one(kind, d, has_seg=has_seg, seg_full=full, arch=a.arch)
                print(f"| {kind} | {d} | {has_seg} | {r['seg_full']} | {r['config']} | {r['regs']} | "
                      f"{r['stack_bytes']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))
    sys.exit(main())
