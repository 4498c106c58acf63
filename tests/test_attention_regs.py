"""benchmarks/attention_regs.py: the attention kernels compile offline for sm_90 and report registers and stack.

Run as a subprocess: the tests' own process imports the kernels under Triton's interpreter."""

import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
_SCRIPT = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "attention_regs.py")
pytestmark = pytest.mark.skipif(
    not (os.path.exists(os.path.join(_TOOLS, "ptxas")) and os.path.exists(os.path.join(_TOOLS, "cuobjdump"))),
    reason="Triton's CUDA backend tools (ptxas, cuobjdump) are not installed",
)


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, _SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)


def test_segment_full_forward_compiles_for_hopper():
    from litespark_kernels.ops import _attention_triton as at

    r = _run("--kernels", "fwd", "--dims", "64", "--seg-full", "on")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| fwd |")]
    assert len(rows) == 1, r.stdout
    bm, bn, warps, stages, _ = at.CONFIGS[("fwd", 64)]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:5] == ["fwd", "64", "True", "True", f"{bm}x{bn} w{warps} s{stages}"]
    assert 16 <= int(cells[5]) <= 255 and int(cells[6]) >= 0


def test_unknown_kernel_is_one_line_error():
    r = _run("--kernels", "fwd,bogus")
    assert r.returncode == 2 and re.search(r"unknown \['bogus'\]", r.stderr)
