"""Shortened SAT quality check (benchmarks/sat_quality.py --quick): continual pre-training with the ladder schedule
ends within 2% of dense training's held-out loss at the same number of steps."""

import importlib.util
import pathlib

import pytest


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sat_ladder_cpt_matches_dense_held_out_loss():
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "sat_quality.py"
    spec = importlib.util.spec_from_file_location("sat_quality", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.run(quick=True, schedules=("ladder",), verbose=False)
    assert r["dense"] < r["pretrained_held_out"]  # continual pre-training helps on the new domain
    assert abs(r["sat_ladder_rel_gap"]) < 0.02, r
    assert r["sat_ladder_mean_executed_flops_fraction"] < 0.97  # SAT really skipped work
