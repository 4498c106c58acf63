"""benchmarks/bench_sat.py --smoke (issue #19's measurement, CPU-sized): the JSON's schema, the dense reference is
Litespark (not the stock model), SAT rows for both freeze values, SFT rows with held-out loss for dense and SAT."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_sat")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "kernels"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_sat.py"), "--smoke", "--profile",
                           "--peak-tflops", "1", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "bench_sat_cpu.json").read_text()), out, proc.stdout


def test_outputs_and_schema(smoke):
    result, out, stdout = smoke
    assert (out / "bench_sat_cpu.png").exists() and (out / "profile_sat_step_cpu.txt").exists()
    assert "mlp_micro" in result and result["config"]["pretrain"]["name"] == "tiny"
    assert "| mode | variant |" in stdout and "targets:" in stdout
    rows = result["e2e"]
    assert {r["mode"] for r in rows} == {"pretrain", "sft"}
    for r in rows:
        assert r["status"] == "ok", (r["name"], r.get("status"), r.get("traceback"))
        for k in ("mode", "variant", "reference", "rate_mlp", "rate_heads", "freeze", "schedule"):
            assert k in r, (r["name"], k)
        for k in ("step_ms", "tokens_per_second", "executed_flops_fraction", "mfu_executed",
                  "mfu_dense_equivalent", "speedup"):
            assert _num(r[k]) and r[k] > 0, (r["name"], k, r[k])
        assert 0 < r["executed_flops_fraction"] <= 1.0
        assert r["mfu_executed"] == pytest.approx(r["mfu_dense_equivalent"] * r["executed_flops_fraction"])
    assert set(result["targets"]) >= {"pretrain_step_speedup_0.5_freeze", "sft_time_ratio", "sft_heldout_loss_dense",
                                      "sft_heldout_loss_sat"}


def test_pretrain_reference_is_litespark_and_sat_rows_cover_both_freezes(smoke):
    result, _, _ = smoke
    pre = [r for r in result["e2e"] if r["mode"] == "pretrain"]
    ref = [r for r in pre if r["reference"]]
    assert len(ref) == 1 and ref[0]["variant"] == "litespark" and ref[0]["speedup"] == pytest.approx(1.0)
    assert ref[0]["litespark_swapped"], "the reference row did not run the Litespark layers"
    stock = [r for r in pre if r["variant"] == "stock"]
    assert len(stock) == 1 and not stock[0]["reference"]
    sat = [r for r in pre if r["variant"] == "litespark+sat"]
    assert {(r["rate_mlp"], r["rate_heads"], r["freeze"]) for r in sat} == \
        {(x, x, f) for x in (0.25, 0.5) for f in (True, False)}
    for r in sat:
        assert r["schedule"] == "constant" and r["executed_flops_fraction"] < 1.0
        assert r["speedup"] == pytest.approx(ref[0]["step_ms"] / r["step_ms"])
        assert r["omission_rates_timed"]["mlp_omitted"] > 0  # the timed steps ran sparse
    for r in (ref[0], stock[0]):
        assert r["executed_flops_fraction"] == 1.0
    half = [r for r in sat if r["rate_mlp"] == 0.5]
    assert all(r["executed_flops_fraction"] < min(q["executed_flops_fraction"] for q in sat if q["rate_mlp"] == 0.25)
               for r in half)


def test_sft_rows_carry_heldout_loss_and_time_ratio(smoke):
    result, _, _ = smoke
    sft = {r["variant"]: r for r in result["e2e"] if r["mode"] == "sft"}
    assert set(sft) == {"litespark", "litespark+sat"}
    dense, sat = sft["litespark"], sft["litespark+sat"]
    assert dense["reference"] and not sat["reference"]
    assert sat["schedule"] == "ladder" and sat["rate_mlp"] == 0.5 and sat["freeze"] is True
    for r in (dense, sat):
        assert _num(r["heldout_loss"]) and _num(r["total_train_s"]) and r["total_train_s"] > 0
        assert r["steps"] == result["config"]["sft"]["steps"] and len(r["losses"]) == r["steps"]
    assert dense["time_ratio_vs_dense"] == pytest.approx(1.0)
    assert sat["time_ratio_vs_dense"] == pytest.approx(sat["total_train_s"] / dense["total_train_s"])
    # the ladder: rates step down from the initial rate and the run ends dense; the dense run never omits
    rates = sat["rates_mlp_per_step"]
    assert rates[0] == 0.5 and rates[-1] == 0.0 and rates == sorted(rates, reverse=True)
    assert set(dense["rates_mlp_per_step"]) == {0.0}
    assert sat["executed_flops_fraction"] < 1.0 and dense["executed_flops_fraction"] == 1.0
    # same data and seed: the first step (SAT's dense importance measurement) has the same loss
    assert sat["losses"][0] == pytest.approx(dense["losses"][0], abs=1e-5)
