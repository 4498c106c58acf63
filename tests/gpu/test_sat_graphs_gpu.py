"""GPU checks of SAT inside the CUDA graphs (``LITESPARK_SAT_GRAPHS=1``; litespark_hf/graphs.py, run with
``pytest -m gpu``): two copies of one random Llama with SAT on MLP channels and KV groups, trained side by side with
and without the graphs on padded batches of varying length, must select the same units, measure the same importance
and give the same losses and gradients, over ladder rungs (another kept count: another capture) and dense-refresh
steps; the graphed copy must really have replayed graphs."""

import copy

import pytest
import torch

import litespark_hf
from litespark_hf import graphs as G
from litespark_hf.sat import core
from test_cuda_graphs_gpu import _batches, _grads, _llama, _step
from tiny_models import rel_err

pytestmark = pytest.mark.gpu


def _pair(monkeypatch, **sat):
    monkeypatch.setenv("LITESPARK_SAT_GRAPHS", "1")
    eager = _llama()
    graphed = copy.deepcopy(eager)
    cfg = dict(sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_exempt_layers="", **sat)
    litespark_hf.apply(eager, cuda_graphs=False, **cfg)
    litespark_hf.apply(graphed, cuda_graphs=True, **cfg)
    return eager, graphed


def _train(eager, graphed, steps, check):
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    for i, batch in enumerate(_batches(steps, seed=3)):
        for m in (eager, graphed):
            core.sat_step(m, i, steps)
        sel = [[None if m._sat_state.index is None else m._sat_state.index.clone()
                for m in core.controller(x).modules] for x in (eager, graphed)]
        assert all(a is None and b is None or torch.equal(a, b) for a, b in zip(*sel)), i
        le, lg = _step(eager, batch, False), _step(graphed, batch, False)
        tol = 1e-5 if i == 0 else 1e-3
        assert abs(le.item() - lg.item()) <= tol * abs(le.item()), (i, le.item(), lg.item())
        ge, gg = _grads(eager), _grads(graphed)
        assert ge.keys() == gg.keys()
        worst = max(rel_err(gg[n], ge[n]) for n in ge)
        assert worst < tol, (i, worst)
        check(i)
        for m, o in zip((eager, graphed), opts):
            with core.frozen_omitted(m, o):
                o.step()
            o.zero_grad(set_to_none=True)
    return G.manager_of(graphed).stats


def test_sat_random_selection_over_ladder_rungs(monkeypatch):
    """fp32, the random metric (no statistics): the ladder's two rungs and its dense end, several buckets."""
    eager, graphed = _pair(monkeypatch, sat_metric="random", sat_schedule="ladder", sat_ladder_steps=2,
                           sat_dense_fraction=0.25)

    def omitted_grads_are_zero(i):
        for m in core.controller(graphed).modules:
            st = m._sat_state
            if st.kind == "mlp" and st.omitted is not None and st.omitted.numel():
                assert float(m.gate_proj.weight.grad.index_select(0, st.omitted).abs().max()) == 0.0, i

    stats = _train(eager, graphed, 10, omitted_grads_are_zero)
    assert stats["graphed"] >= 8 and stats["captures"] >= 2, dict(stats)
    assert "eager: SAT" not in stats, dict(stats)


def test_sat_importance_statistics_match_eager(monkeypatch):
    """fp32, activation-magnitude importance with a dense refresh every 3 steps: the accumulated statistics of each
    step (over the real tokens, not the bucket's filler) match the eager ones, so the selections stay equal."""
    eager, graphed = _pair(monkeypatch, sat_metric="activation_magnitude", sat_schedule="constant",
                           sat_refresh_interval=3)

    def same_statistics(i):
        for a, b in zip(core.controller(eager).modules, core.controller(graphed).modules):
            sa, sb = a._sat_state, b._sat_state
            assert (sa.acc is None) == (sb.acc is None), i
            if sa.acc is not None:
                torch.testing.assert_close(sb.count, sa.count, rtol=0, atol=0)
                torch.testing.assert_close(sb.acc, sa.acc, rtol=1e-4, atol=1e-7)

    stats = _train(eager, graphed, 9, same_statistics)
    assert stats["graphed"] >= 7 and stats["captures"] >= 2, dict(stats)


def test_sat_on_lora_graphed_equals_eager(monkeypatch):
    """PEFT LoRA on every projection (SAT's LoRA path: the frozen base gathered, each adapter on the kept channels),
    fp32, random selection, graphed vs eager."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("LITESPARK_SAT_GRAPHS", "1")
    torch.manual_seed(0)
    lora_cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    eager = peft.get_peft_model(_llama(), lora_cfg)
    graphed = copy.deepcopy(eager)
    cfg = dict(sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_exempt_layers="", sat_metric="random",
               sat_schedule="constant")
    litespark_hf.apply(eager, cuda_graphs=False, **cfg)
    litespark_hf.apply(graphed, cuda_graphs=True, **cfg)
    stats = _train(eager, graphed, 6, lambda i: None)
    assert stats["graphed"] >= 5, dict(stats)
