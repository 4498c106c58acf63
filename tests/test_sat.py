"""Sparsity-Accelerated Training (litespark_hf.sat): kernels, selection, schedule, optimizer semantics, Trainer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import litespark_hf
from litespark_hf.sat import (
    SATCallback, controller, disable_sat, enable_sat, executed_flops_fraction, executed_flops_per_token,
    frozen_omitted, omission_rates, sat_step, scheduled_rate,
)
from litespark_kernels.ops.sparse_attention_heads import head_rows
from litespark_kernels.ops.sparse_mlp import (
    gathered_linear, sparse_gated_mlp, sparse_gated_mlp_fused, sparse_gated_mlp_reference, sparse_mlp,
    sparse_mlp_reference,
)
from tiny_models import FAMILIES, random_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------ schedule
def test_ladder_schedule_steps_down_and_ends_dense():
    rates = [scheduled_rate(0.5, s, 16, "ladder", ladder_steps=4, dense_fraction=0.25) for s in range(16)]
    assert rates[:3] == [0.5] * 3 and rates[3:6] == [0.375] * 3 and rates[6:9] == [0.25] * 3
    assert rates[9:12] == [0.125] * 3 and rates[12:] == [0.0] * 4
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert scheduled_rate(0.3, 99, 100, "constant") == 0.3
    assert scheduled_rate(0.0, 0, None, "ladder") == 0.0
    with pytest.raises(ValueError):
        scheduled_rate(0.5, 0, None, "ladder")
    with pytest.raises(ValueError):
        scheduled_rate(0.5, 0, 10, "cosine")


# ------------------------------------------------------------------ kernels
def _mlp_inputs(shape, seed=0):
    torch.manual_seed(seed)
    hidden, inter = 123, 77
    x = torch.randn(*shape, hidden, requires_grad=True)
    wg, wu = (torch.randn(inter, hidden) * 0.1).requires_grad_(), (torch.randn(inter, hidden) * 0.1).requires_grad_()
    wd = (torch.randn(hidden, inter) * 0.1).requires_grad_()
    index = torch.randperm(inter)[:40].sort().values
    omitted = torch.ones(inter, dtype=torch.bool)
    omitted[index] = False
    return x, wg, wu, wd, index, omitted, torch.randn(*shape, hidden)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("shape", [(3, 37), (1000,)])
@pytest.mark.parametrize("fused", [False, True])
def test_sparse_gated_mlp_matches_masked_reference(activation, shape, fused):
    """The per-weight-gather version and the gathered-GEMM version (`sparse_gated_mlp_fused`, what SATGatedMLP runs):
    values and every gradient equal the masked reference, omitted rows/columns get exactly zero gradient."""
    x, wg, wu, wd, index, omitted, go = _mlp_inputs(shape)
    if fused:
        out = sparse_gated_mlp_fused(x, wg, wu, wd, index, activation)[0]
    else:
        out = sparse_gated_mlp(x, wg, wu, wd, index, activation)
    grads = torch.autograd.grad(out, (x, wg, wu, wd), go)
    ref = sparse_gated_mlp_reference(x, wg, wu, wd, index, activation)
    ref_grads = torch.autograd.grad(ref, (x, wg, wu, wd), go)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(grads[1][omitted]) == 0 and torch.count_nonzero(grads[2][omitted]) == 0
    assert torch.count_nonzero(grads[3][:, omitted]) == 0
    assert torch.count_nonzero(grads[1][~omitted]) > 0
    dense = sparse_gated_mlp(x, wg, wu, wd, None, activation)
    torch.testing.assert_close(dense, sparse_gated_mlp_reference(x, wg, wu, wd, None, activation))


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_fused_sparse_gated_mlp_hidden_and_casts(activation):
    """`sparse_gated_mlp_fused`: ``h`` is act(gate) * up of the kept channels (no gradient); under bf16 autocast,
    gathering from bf16 copies (cast views) gives the output of gathering from the fp32 weights, and of the
    per-weight version; the weights' gradients stay fp32."""
    x, wg, wu, wd, index, _, go = _mlp_inputs((1000,), seed=3)
    _, h = sparse_gated_mlp_fused(x, wg, wu, wd, index, activation)
    act = F.silu if activation == "silu" else (lambda t: F.gelu(t, approximate="tanh"))
    torch.testing.assert_close(h, act(x @ wg[index].t()) * (x @ wu[index].t()), atol=1e-5, rtol=1e-5)
    assert not h.requires_grad
    ref = sparse_gated_mlp_reference(x, wg, wu, wd, index, activation)
    ref_grads = torch.autograd.grad(ref, (x, wg, wu, wd), go)
    casts = (torch.cat([wg, wu]).detach().bfloat16(), wd.detach().bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o_plain, _ = sparse_gated_mlp_fused(x, wg, wu, wd, index, activation)
        o_cast, _ = sparse_gated_mlp_fused(x, wg, wu, wd, index, activation, cast_gate_up=casts[0],
                                           cast_down=casts[1])
        o_old, _ = sparse_gated_mlp(x, wg, wu, wd, index, activation, return_hidden=True)
    assert o_cast.dtype == torch.bfloat16 and torch.equal(o_cast, o_plain) and torch.equal(o_cast, o_old)
    g16 = torch.autograd.grad(o_cast, (x, wg, wu, wd), go.bfloat16())
    assert all(g.dtype == torch.float32 for g in g16)
    for g, r in zip(g16, ref_grads):
        assert ((g - r).norm() / r.norm()).item() < 2e-2  # bf16 operands


def test_sparse_plain_mlp_matches_masked_reference():
    torch.manual_seed(1)
    hidden, inter = 64, 96
    x = torch.randn(2, 19, hidden, requires_grad=True)
    wf, bf = torch.randn(inter, hidden, requires_grad=True), torch.randn(inter, requires_grad=True)
    wp, bp = torch.randn(hidden, inter, requires_grad=True), torch.randn(hidden, requires_grad=True)
    index = torch.arange(0, inter, 3)
    go = torch.randn(2, 19, hidden)
    out = sparse_mlp(x, wf, bf, wp, bp, index)
    grads = torch.autograd.grad(out, (x, wf, bf, wp, bp), go)
    ref = sparse_mlp_reference(x, wf, bf, wp, bp, index)
    ref_grads = torch.autograd.grad(ref, (x, wf, bf, wp, bp), go)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-5)
    omitted = torch.ones(inter, dtype=torch.bool)
    omitted[index] = False
    assert torch.count_nonzero(grads[2][omitted]) == 0 and torch.count_nonzero(grads[3][:, omitted]) == 0


def test_gathered_linear_rows_and_columns():
    """`gathered_linear` (SAT's kept-head projections as one GEMM): fp32 values and gradients equal F.linear on the
    gathered weights, zero gradient outside the rows/columns, biases on some weights only; under bf16 autocast the
    gather from a cast copy equals the gather from the fp32 weights."""
    torch.manual_seed(4)
    x = torch.randn(3, 333, 48, requires_grad=True)
    ws = [torch.randn(n, 48, requires_grad=True) for n in (32, 16, 16)]
    bs = [None, torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)]
    rows = [torch.tensor([2, 3, 8, 9, 30]), torch.tensor([0, 5, 7]), torch.tensor([0, 5, 7])]
    go = torch.randn(3, 333, 11)
    y = gathered_linear(x, ws, bs, rows)
    ref = torch.cat([F.linear(x, w[r], None if b is None else b[r]) for w, b, r in zip(ws, bs, rows)], -1)
    leaves = [x, *ws, bs[1], bs[2]]
    g = torch.autograd.grad(y, leaves, go)
    r = torch.autograd.grad(ref, leaves, go)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, r):  # weight gradients sum 999 tokens: fp32 summation order
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert torch.count_nonzero(g[1][[0, 1, 4]]) == 0 and torch.count_nonzero(g[1][rows[0]]) > 0
    wo, bo = torch.randn(20, 32, requires_grad=True), torch.randn(20, requires_grad=True)
    a = torch.randn(7, 5, requires_grad=True)
    cols = torch.tensor([1, 4, 6, 30, 31])
    y = gathered_linear(a, [wo], [bo], [cols], dim=1)
    ref = F.linear(a, wo[:, cols], bo)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    ga = torch.autograd.grad(y, (a, wo, bo), torch.ones_like(y))
    gr = torch.autograd.grad(ref, (a, wo, bo), torch.ones_like(y))
    for p, q in zip(ga, gr):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one weight"):
        gathered_linear(a, [wo, wo], [None, None], [cols, cols], dim=1)
    cast = torch.cat(ws).detach().bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(gathered_linear(x, ws, bs, rows, cast=cast), gathered_linear(x, ws, bs, rows))


def test_sat_on_litespark_gathers_from_the_bf16_copies():
    """SAT on top of Litespark under bf16 autocast: the sparse MLP and attention read this forward's bf16 weight
    copies (`cast_projection_weights`); loss and every gradient are bitwise those of the same step with the copies
    withheld (gathering from the fp32 weights and casting)."""
    from litespark_hf.modules import lm_head

    model = tiny_model("llama", num_hidden_layers=3)
    litespark_hf.apply(model, attention=False, **_sat_kwargs(sat_metric="random"))
    model.train()
    ids = random_batch(2, 21)
    seen = []
    real = lm_head.cast_projection_weights

    def spy(m, device_type):
        given = real(m, device_type)
        seen.append(len(given))
        return given

    out = []
    sat_step(model, 1, 10)  # one selection for both forwards
    for cast in (True, False):
        lm_head.cast_projection_weights = spy if cast else (lambda m, d: [])
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        finally:
            lm_head.cast_projection_weights = real
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    assert seen and seen[0] > 0  # the copies were made and handed out

    def poisoned(m, device_type):  # the SAT modules' copies zeroed: a path that reads them must change the loss
        given = real(m, device_type)
        for mod in given:
            for slot in ("gate_up", "qkv"):
                if slot in mod.__dict__["_litespark_casts"]:
                    mod.__dict__["_litespark_casts"][slot].zero_()
        return given

    lm_head.cast_projection_weights = poisoned
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert not torch.equal(model(input_ids=ids, labels=ids).loss, out[0][0])
    finally:
        lm_head.cast_projection_weights = real
    assert omission_rates(model)["mlp_omitted"] == pytest.approx(0.5)
    assert torch.equal(out[0][0], out[1][0])
    for name, g in out[0][1].items():
        assert torch.equal(g, out[1][1][name]), name


def test_head_rows_gqa():
    q_rows, kv_rows = head_rows(torch.tensor([1, 3]), n_rep=2, head_dim=4)
    assert q_rows.tolist() == list(range(8, 16)) + list(range(24, 32))
    assert kv_rows.tolist() == list(range(4, 8)) + list(range(12, 16))


# ------------------------------------------------------------------ model-level exactness
def _sat_kwargs(**kw):
    base = dict(sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_schedule="constant",
                sat_exempt_layers="", sat_refresh_interval=0)
    base.update(kw)
    return base


def _omitted(st):
    mask = torch.ones(st.units, dtype=torch.bool)
    if st.index is not None:
        mask[st.index.cpu()] = False
    return mask


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_model_equals_masked_dense_model(family):
    """A SAT step equals the dense model whose omitted channels/heads are cut off (down/o columns zeroed);
    every omitted weight's gradient is exactly zero and the kept weights' gradients agree."""
    model = tiny_model(family, num_hidden_layers=3)
    oracle = copy.deepcopy(model)
    enable_sat(model, **_sat_kwargs())
    model.train()
    oracle.train()
    ids = random_batch(2, 21)
    sat_step(model, 0, 10)  # dense refresh step: measures importance
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad()
    sat_step(model, 1, 10)
    assert omission_rates(model)["mlp_omitted"] == pytest.approx(0.5)
    assert omission_rates(model)["heads_omitted"] == pytest.approx(0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()

    ctrl = controller(model)
    o_layers = dict(zip(ctrl.mlps, oracle.model.layers))
    with torch.no_grad():
        for mlp, layer in o_layers.items():
            om = _omitted(mlp._sat_state)
            down = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.c_proj
            down.weight[:, om] = 0
        for attn, layer in zip(ctrl.attns, oracle.model.layers):
            st = attn._sat_state
            q_om, _ = head_rows(_omitted(st).nonzero().squeeze(1), st.n_rep, st.head_dim)
            layer.self_attn.o_proj.weight[:, q_om] = 0
    ref = oracle(input_ids=ids, labels=ids).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)

    params = dict(oracle.named_parameters())
    for mlp in ctrl.mlps:
        om = _omitted(mlp._sat_state)
        up = getattr(mlp, "gate_proj", None) or mlp.c_fc
        down = getattr(mlp, "down_proj", None) or mlp.c_proj
        assert torch.count_nonzero(up.weight.grad[om]) == 0
        assert torch.count_nonzero(down.weight.grad[:, om]) == 0
    for attn in ctrl.attns:
        st = attn._sat_state
        q_om, kv_om = head_rows(_omitted(st).nonzero().squeeze(1), st.n_rep, st.head_dim)
        assert torch.count_nonzero(attn.q_proj.weight.grad[q_om]) == 0
        assert torch.count_nonzero(attn.k_proj.weight.grad[kv_om]) == 0
        assert torch.count_nonzero(attn.v_proj.weight.grad[kv_om]) == 0
        assert torch.count_nonzero(attn.o_proj.weight.grad[:, q_om]) == 0
    for name, p in model.named_parameters():
        r = params[name].grad
        if name.endswith(("o_proj.weight", "down_proj.weight", "c_proj.weight")):
            continue  # oracle's zeroed columns still get gradients; compared where kept below
        torch.testing.assert_close(p.grad, r, atol=1e-5, rtol=1e-4, msg=name)
    for mlp, layer in o_layers.items():
        keep = ~_omitted(mlp._sat_state)
        down = getattr(mlp, "down_proj", None) or mlp.c_proj
        rdown = layer.mlp.down_proj if hasattr(layer.mlp, "down_proj") else layer.mlp.c_proj
        torch.testing.assert_close(down.weight.grad[:, keep], rdown.weight.grad[:, keep], atol=1e-5, rtol=1e-4)


def _train(model, steps, sat, apply_freeze=True, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    losses = []
    for s in range(steps):
        if sat:
            sat_step(model, s, steps)
        ids = random_batch(2, 20, seed=s)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if sat and apply_freeze:
            with frozen_omitted(model, opt):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["llama", "starcoder2"])
@pytest.mark.parametrize("with_apply", [False, True])
def test_rate_zero_is_identical_to_dense_training(family, with_apply):
    dense = tiny_model(family)
    sat = copy.deepcopy(dense)
    if with_apply:
        litespark_hf.apply(dense, attention=False)
        litespark_hf.apply(sat, attention=False)
    enable_sat(sat, sat_omission_rate_mlp=0.0, sat_omission_rate_heads=0.0)
    dense.train()
    sat.train()
    assert _train(dense, 4, sat=False) == _train(sat, 4, sat=True)
    for (n, a), (_, b) in zip(dense.named_parameters(), sat.named_parameters()):
        assert torch.equal(a, b), n
    assert executed_flops_fraction(sat, 20) == 1.0


def test_ladder_end_is_dense_and_eval_is_dense():
    model = tiny_model("llama", num_hidden_layers=3)
    ref = copy.deepcopy(model)
    enable_sat(model, **_sat_kwargs(sat_schedule="ladder", sat_ladder_steps=2, sat_dense_fraction=0.5))
    model.train()
    ref.train()
    ids = random_batch(2, 16)
    sat_step(model, 0, 8)
    model(input_ids=ids, labels=ids)
    sat_step(model, 1, 8)
    assert omission_rates(model)["mlp_omitted"] > 0
    model.eval()  # evaluation always runs dense
    ref.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits)
    model.train()
    sat_step(model, 6, 8)
    assert omission_rates(model) == {"mlp": 0.0, "heads": 0.0, "mlp_omitted": 0.0, "heads_omitted": 0.0,
                                     "dense_refresh": 0.0}
    assert torch.equal(model(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss)


# ------------------------------------------------------------------ optimizer semantics
def _snapshot(model, opt):
    return {n: (p.detach().clone(), {k: v.clone() for k, v in opt.state.get(p, {}).items() if torch.is_tensor(v)})
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("freeze", [True, False])
def test_optimizer_semantics_for_omitted_weights(freeze):
    model = tiny_model("llama", num_hidden_layers=2)
    enable_sat(model, **_sat_kwargs())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for s in range(3):  # step 0 dense (refresh) builds Adam state everywhere, steps 1-2 sparse
        sat_step(model, s, 10)
        ids = random_batch(2, 16, seed=s)
        model(input_ids=ids, labels=ids).loss.backward()
        before = _snapshot(model, opt)
        if freeze:
            with frozen_omitted(model, opt):
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    mlp = controller(model).mlps[0]
    om = _omitted(mlp._sat_state)
    assert om.any() and (~om).any()
    name = "model.layers.0.mlp.gate_proj.weight"
    p0, st0 = before[name]
    p1 = mlp.gate_proj.weight.detach()
    st1 = opt.state[mlp.gate_proj.weight]
    assert not torch.equal(p1[~om], p0[~om])  # kept rows train
    if freeze:  # omitted rows and their Adam moments: bit-for-bit unchanged
        assert torch.equal(p1[om], p0[om])
        assert torch.equal(st1["exp_avg"][om], st0["exp_avg"][om])
        assert torch.equal(st1["exp_avg_sq"][om], st0["exp_avg_sq"][om])
        down = mlp.down_proj.weight.detach()
        assert torch.equal(down[:, om], before["model.layers.0.mlp.down_proj.weight"][0][:, om])
        attn = controller(model).attns[0]
        st = attn._sat_state
        q_om, kv_om = head_rows(_omitted(st).nonzero().squeeze(1), st.n_rep, st.head_dim)
        assert torch.equal(attn.k_proj.weight.detach()[kv_om], before["model.layers.0.self_attn.k_proj.weight"][0][kv_om])
    else:  # zero gradient reaches AdamW: momentum and weight decay still move omitted rows, moments decay
        assert not torch.equal(p1[om], p0[om])
        torch.testing.assert_close(st1["exp_avg"][om], 0.9 * st0["exp_avg"][om])


# ------------------------------------------------------------------ selection, exemption, FLOPs, composition
def test_selection_modes_and_exempt_layers():
    for selection, metric in (("topk", "activation_magnitude"), ("sample", "activation_magnitude"),
                              ("topk", "random")):
        model = tiny_model("qwen3", num_hidden_layers=4, intermediate_size=40)
        enable_sat(model, **_sat_kwargs(sat_selection=selection, sat_metric=metric, sat_exempt_layers="0,-1",
                                         sat_omission_rate_mlp=0.25))
        model.train()
        ids = random_batch(2, 12)
        for s in range(3):
            sat_step(model, s, 10)
            model(input_ids=ids, labels=ids).loss.backward()
        ctrl = controller(model)
        states = [m._sat_state for m in ctrl.mlps]
        assert states[0].index is None and states[3].index is None  # exempt
        for st in states[1:3]:
            assert st.index.numel() == 30 and torch.equal(st.index, st.index.unique())
        if selection == "topk" and metric == "activation_magnitude":
            st = states[1]
            assert set(st.index.tolist()) == set(torch.topk(st.score, 30).indices.tolist()) or st.score is not None


def test_topk_keeps_most_important_channels():
    model = tiny_model("llama", num_hidden_layers=1)
    enable_sat(model, **_sat_kwargs(sat_omission_rate_heads=0.0))
    model.train()
    ids = random_batch(2, 12)
    sat_step(model, 0, 10)  # dense refresh
    model(input_ids=ids, labels=ids)
    sat_step(model, 1, 10)
    st = controller(model).mlps[0]._sat_state
    expected = torch.topk(st.score, st.kept()).indices.sort().values
    assert torch.equal(st.index, expected)


def test_executed_flops():
    model = tiny_model("llama", num_hidden_layers=2)  # hidden 64, inter 96, 4 heads / 2 kv, head_dim 16
    n = sum(p.numel() for p in model.parameters())
    dense = 6 * n + 2 * 12 * 64 * 100
    assert executed_flops_per_token(model, 100) == (dense, dense)
    enable_sat(model, **_sat_kwargs())
    model.train()
    sat_step(model, 0, 10)
    assert executed_flops_fraction(model, 100) == 1.0  # refresh step is dense
    sat_step(model, 1, 10)
    mlp_omitted = 2 * 48 * 3 * 64
    attn_omitted = 2 * (0.5 * (64 * 64 * 2 + 64 * 32 * 2))
    scores_omitted = 2 * 0.5 * 12 * 64 * 100
    executed, d = executed_flops_per_token(model, 100)
    assert d == dense
    assert executed == pytest.approx(dense - 6 * mlp_omitted - 6 * attn_omitted - scores_omitted)


def test_composes_with_apply_and_restore():
    model = tiny_model("llama")
    litespark_hf.apply(model, attention=False)
    enable_sat(model, **_sat_kwargs())
    mlp = model.model.layers[0].mlp
    assert type(mlp).__name__ == "SATLitesparkLlamaMLP"
    litespark_hf.apply(model, attention=False)  # applying again changes nothing
    assert type(mlp).__name__ == "SATLitesparkLlamaMLP"
    disable_sat(model)
    assert type(mlp).__name__ == "LitesparkLlamaMLP"
    enable_sat(model, **_sat_kwargs())
    litespark_hf.restore(model)
    assert type(mlp).__name__ == "LlamaMLP" and type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert set(model.state_dict()) == set(tiny_model("llama").state_dict())


def test_trainer_callback_drives_the_ladder(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = tiny_model("llama", num_hidden_layers=3)
    enable_sat(model, sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_ladder_steps=2,
               sat_dense_fraction=0.25, sat_exempt_layers="0", sat_refresh_interval=3)
    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({"input_ids": torch.randint(0, 128, (32, 16), generator=g).tolist()})
    data = data.map(lambda r: {"labels": r["input_ids"]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, logging_steps=2, use_cpu=True, report_to=[],
                             save_strategy="no", learning_rate=1e-3, disable_tqdm=True)
    cb = SATCallback(seq_len=16)
    seen = []

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            seen.append(dict(logs))

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb, Recorder()])
    trainer.train()
    rates = [h["mlp"] for h in cb.history]
    assert rates == [0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.0, 0.0]
    refresh = [h["dense_refresh"] for h in cb.history]
    assert refresh == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    fractions = [h["executed_flops_fraction"] for h in cb.history]
    assert fractions[1] < fractions[4] < fractions[6] == 1.0
    logged = [h for h in seen if "sat/executed_flops_fraction" in h]
    assert logged and all(0 < h["sat/executed_flops_fraction"] <= 1 for h in logged)


# ------------------------------------------------------------------ end-to-end speed pieces
def test_head_rows_batched_equals_per_layer():
    groups = torch.tensor([[0, 2, 3], [1, 2, 3]])
    q, kv = head_rows(groups, n_rep=3, head_dim=5)
    for i in range(2):
        qi, kvi = head_rows(groups[i], 3, 5)
        assert torch.equal(q[i], qi) and torch.equal(kv[i], kvi)


def test_gather_weight_casts_once_under_autocast_and_zeroes_omitted_grads():
    from litespark_kernels.ops.sparse_mlp import gather_weight

    torch.manual_seed(0)
    w = torch.randn(37, 23, requires_grad=True)
    idx = torch.tensor([1, 4, 5, 30])
    for dim in (0, 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g = gather_weight(w, idx[idx < w.shape[dim]], dim)
        assert g.dtype == torch.bfloat16
        ref = w.detach().index_select(dim, idx[idx < w.shape[dim]]).bfloat16()
        assert torch.equal(g, ref)
        go = torch.randn_like(g)
        (grad,) = torch.autograd.grad(g, w, go)
        expected = torch.zeros_like(w).index_copy_(dim, idx[idx < w.shape[dim]], go.float())
        assert grad.dtype == torch.float32 and torch.equal(grad, expected)
    assert gather_weight(w, idx, 0).dtype == torch.float32  # no autocast: weight dtype


def test_selection_precomputes_omitted_indices_without_host_sync():
    model = tiny_model("llama", num_hidden_layers=3)
    enable_sat(model, **_sat_kwargs())
    model.train()
    ids = random_batch(2, 12)
    sat_step(model, 0, 10)
    model(input_ids=ids, labels=ids)
    sat_step(model, 1, 10)
    for m in controller(model).modules:
        st = m._sat_state
        both = torch.cat([st.index, st.omitted]).sort().values
        assert torch.equal(both, torch.arange(st.units))  # kept and omitted partition the units
        if st.kind == "attention":
            q_om, kv_om = head_rows(st.omitted, st.n_rep, st.head_dim)
            assert torch.equal(st.omitted_rows[0], q_om) and torch.equal(st.omitted_rows[1], kv_om)


@pytest.mark.parametrize("family", ["smollm3", "olmo2"])
def test_attention_sat_refuses_families_it_does_not_reproduce(family):
    """SmolLM3 (layers without RoPE) and OLMo2 (q/k norms over the whole projection): SAT's sparse attention would
    apply RoPE / per-head norms where stock does not, so their attention stays dense (warned), the MLPs go sparse."""
    from litespark_hf.sat.core import SAT_ATTENTION_MODEL_TYPES
    from litespark_hf.sat.modules import is_sat_module

    assert family not in SAT_ATTENTION_MODEL_TYPES
    model = tiny_model(family, attn_implementation="sdpa")
    litespark_hf.apply(model)
    with pytest.warns(UserWarning, match="stays dense"):
        enable_sat(model, sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_schedule="constant",
                   sat_exempt_layers="")
    assert not any(is_sat_module(layer.self_attn) for layer in model.model.layers)
    assert all(is_sat_module(layer.mlp) for layer in model.model.layers)
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    sat_step(model, 0, 10)
    model(input_ids=ids, labels=ids).loss.backward()  # runs (OLMo2 crashed in the sparse attention before)


def _sat_pair(apply=True, layers=3):
    a = tiny_model("llama", num_hidden_layers=layers)
    if apply:
        litespark_hf.apply(a)
    b = copy.deepcopy(a)
    for m in (a, b):
        enable_sat(m, **_sat_kwargs())
        m.train()
    return a, b


def _sparse_step(model, warm, **batch):
    """A dense measuring step on ``warm``, then a sparse step on ``batch``: (loss, selection, gradients)."""
    sat_step(model, 0, 10)
    model(input_ids=warm, labels=warm).loss.backward()
    model.zero_grad()
    sat_step(model, 1, 10)
    selection = [m._sat_state.index.tolist() for m in controller(model).mlps]
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), selection, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("apply", [False, True])
def test_sat_under_gradient_checkpointing_is_exact(apply):
    """Recomputed layers run the same selection (and the measuring step counts each forward once): the same
    losses, selections and gradients as without checkpointing."""
    plain, ckpt = _sat_pair(apply)
    ckpt.gradient_checkpointing_enable()
    ids = random_batch(2, 21)
    got = [_sparse_step(m, ids, input_ids=ids, labels=ids) for m in (plain, ckpt)]
    assert got[0][1] == got[1][1] and all(len(s) > 0 for s in got[0][1])
    assert got[0][0] == got[1][0]
    assert got[0][2].keys() == got[1][2].keys()
    for name, g in got[0][2].items():
        assert torch.equal(g, got[1][2][name]), name


def test_sat_on_padding_free_batches_equals_padded():
    """A padding-free row (sequences packed with position_ids, what TRL's padding_free / packing give) takes the
    same sparse step as the same sequences right-padded."""
    padded, packed = _sat_pair(apply=True)
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(3, 120, (n,), generator=g) for n in (13, 7)]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)], labels[i, :len(s)] = s, 1, s
    row = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(len(s)) for s in seqs])[None]
    row_labels = torch.cat([torch.cat([torch.tensor([-100]), s[1:]]) for s in seqs])[None]
    warm = random_batch(2, 21)
    a = _sparse_step(padded, warm, input_ids=ids, attention_mask=mask, labels=labels)
    b = _sparse_step(packed, warm, input_ids=row, position_ids=position_ids, labels=row_labels)
    assert a[1] == b[1]
    assert a[0] == pytest.approx(b[0], rel=1e-6)
    for name, grad in a[2].items():
        torch.testing.assert_close(b[2][name], grad, atol=1e-6, rtol=1e-5, msg=name)
