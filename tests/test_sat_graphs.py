"""SAT with `LitesparkConfig.cuda_graphs` (``LITESPARK_SAT_GRAPHS=1``), the CPU side: the selection and importance
accumulators at fixed addresses from step to step (what a replayed graph reads), the capture key following the kept
count, and the statistics over the real tokens of a bucket. The replay itself is checked on the GPU
(tests/gpu/test_sat_graphs_gpu.py)."""

import torch

import litespark_hf
from litespark_hf import graphs as G
from litespark_hf.sat import core
from litespark_hf.sat import modules as sat_modules
from tiny_models import tiny_model

SAT = dict(sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_exempt_layers="", cuda_graphs=True)


def _states(ctrl):
    return [m._sat_state for m in ctrl.modules]


def _ptr(t):
    return None if t is None else t.data_ptr()


def test_selection_stays_in_place_while_the_kept_count_does():
    model = tiny_model("llama", num_hidden_layers=3, num_key_value_heads=4)  # 4 KV groups: 2, then 3 kept
    litespark_hf.apply(model, sat_schedule="ladder", sat_ladder_steps=2, sat_dense_fraction=0.0,
                       sat_metric="activation_magnitude", sat_refresh_interval=0, **SAT)
    ctrl = core.controller(model)
    for st in _states(ctrl):  # importance known: the selection is the top half of these scores
        st.score = torch.randn(st.units)
        st.seen = torch.ones(st.units, dtype=torch.bool)
    ctrl.last_refresh = 0  # no dense refresh step: every step selects
    sel = []
    for step in range(4):  # rung 0 (rate 0.5) for steps 0-1, rung 1 (0.25) for steps 2-3
        for st in _states(ctrl):
            st.score = torch.randn(st.units)
        ctrl.set_step(step, max_steps=4)
        sel.append([(st.kept(), _ptr(st.index), _ptr(st.index2), _ptr(st.qkv_rows), st.index.clone())
                    for st in _states(ctrl)])
        for st in _states(ctrl):  # the values are this step's top-k of the scores, sorted
            expect = torch.argsort(st.score, descending=True, stable=True)[:st.kept()].sort().values
            assert torch.equal(st.index, expect)
    for a, b in zip(sel[0], sel[1]):  # same rung: same addresses, new values
        assert a[:4] == b[:4]
    assert any(not torch.equal(a[4], b[4]) for a, b in zip(sel[0], sel[1]))
    for a, c in zip(sel[1], sel[2]):  # next rung: more kept units, other tensors
        assert c[0] > a[0] and c[1] != a[1]
    for c, d in zip(sel[2], sel[3]):
        assert c[:4] == d[:4]


def test_accumulators_are_zeroed_in_place_and_folded():
    model = tiny_model("llama", num_hidden_layers=2)
    litespark_hf.apply(model, sat_schedule="constant", sat_metric="activation_magnitude", sat_refresh_interval=1,
                       **SAT)
    ctrl = core.controller(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    where, scores = [], []
    for step in range(3):  # interval 1: every step a dense refresh, every module collects
        ctrl.set_step(step, max_steps=3)
        where.append([(_ptr(st.acc), _ptr(st.count)) for st in _states(ctrl)])
        assert all(st.collect and float(st.count.sum()) == 0 for st in _states(ctrl))
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(float(st.count.min()) == 1 for st in _states(ctrl))  # one measurement of every unit
        scores.append([st.acc.clone() for st in _states(ctrl)])
    assert where[0] == where[1] == where[2]
    ctrl.set_step(3, max_steps=4)  # folds step 2's measurements into the running score (EMA)
    for st, first, last in zip(_states(ctrl), scores[0], scores[2]):
        # no optimizer step: the same weights measure the same values, not the sum of three steps (zeroed in place)
        assert torch.equal(first, last) and first.abs().sum() > 0
        # the EMA of equal measurements is that measurement
        assert st.seen.all()
        torch.testing.assert_close(st.score, last, rtol=1e-6, atol=0)


def test_the_capture_key_follows_what_sat_computes(monkeypatch):
    model = tiny_model("llama", num_hidden_layers=2, num_key_value_heads=4)
    litespark_hf.apply(model, sat_schedule="ladder", sat_ladder_steps=2, sat_dense_fraction=0.0,
                       sat_metric="random", **SAT)
    manager, ctrl = G.manager_of(model), core.controller(model)
    model.train()
    x, cos = torch.randn(1, 9, 64), torch.randn(1, 9, 16)
    monkeypatch.delenv("LITESPARK_SAT_GRAPHS", raising=False)
    assert not G.sat_graphs_enabled()

    def key():
        k, _, _, why, group = manager._key(manager._modules(), x, cos, 128)
        assert why is None
        return k, group

    ctrl.set_step(0, max_steps=4)
    k0, g0 = key()
    ctrl.set_step(1, max_steps=4)  # same rung, another random selection in the same tensors
    k1, g1 = key()
    assert (k1, g1) == (k0, g0)
    ctrl.set_step(2, max_steps=4)  # the next rung keeps more units: another key and another group
    k2, g2 = key()
    assert k2 != k0 and g2 != g0 and g2[0] == g0[0] == 128
    assert [shape[2] for shape in g2[1]] != [shape[2] for shape in g0[1]]
    # the eligibility: SAT models stay eager unless LITESPARK_SAT_GRAPHS=1
    h = torch.randn(1, 9, 64)
    pos = torch.arange(9)[None]
    args = (h, None, pos, None, False, (cos, cos), {})
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # as on the GPU
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert manager._ineligible(*args) == "SAT"
    monkeypatch.setenv("LITESPARK_SAT_GRAPHS", "1")
    assert manager._ineligible(*args) is None


def test_statistics_over_the_real_tokens_of_a_bucket():
    torch.manual_seed(0)
    tokens, bucket, channels, heads = 7, 16, 12, 3
    h = torch.randn(1, bucket, channels)
    attn = torch.randn(1, bucket, heads, 4)
    weights = torch.zeros(bucket)
    weights[:tokens] = 1
    count = torch.tensor(float(tokens))
    eager_mlp, eager_heads = sat_modules._channel_stats(h[:, :tokens]), sat_modules._head_stats(attn[:, :tokens])
    try:
        sat_modules.GRAPH_ROWS = (weights, count)
        h[:, tokens:] = 1e6  # the filler rows hold whatever an earlier replay left there
        attn[:, tokens:] = -1e6
        graphed_mlp, graphed_heads = sat_modules._channel_stats(h), sat_modules._head_stats(attn)
    finally:
        sat_modules.GRAPH_ROWS = None
    torch.testing.assert_close(graphed_mlp, eager_mlp, rtol=1e-6, atol=0)
    torch.testing.assert_close(graphed_heads, eager_heads, rtol=1e-6, atol=0)
    assert sat_modules._channel_stats(h).max() > 1e5  # without the weights the filler would count
