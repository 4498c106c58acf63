"""SAT on CUDA: bf16 structured-skipping MLP against the masked reference, and a SAT model against its masked-dense
oracle with the sdpa backend."""

from __future__ import annotations

import copy

import pytest
import torch

from litespark_hf.sat import controller, enable_sat, frozen_omitted, sat_step
from litespark_kernels.ops.sparse_attention_heads import head_rows
from litespark_kernels.ops.sparse_mlp import sparse_gated_mlp, sparse_gated_mlp_fused, sparse_gated_mlp_reference
from tiny_models import random_batch, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.mark.parametrize("tokens,hidden,inter", [(1000, 123, 344), (4096, 512, 1408)])
def test_sparse_gated_mlp_bf16(tokens, hidden, inter):
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ws = [(torch.randn(inter, hidden, device=dev) * hidden**-0.5).bfloat16().requires_grad_() for _ in range(2)]
    wd = (torch.randn(hidden, inter, device=dev) * inter**-0.5).bfloat16().requires_grad_()
    index = torch.randperm(inter, device=dev)[: inter // 2].sort().values
    go = torch.randn(tokens, hidden, device=dev, dtype=torch.bfloat16)
    out = sparse_gated_mlp(x, ws[0], ws[1], wd, index)
    grads = torch.autograd.grad(out, (x, ws[0], ws[1], wd), go)
    args32 = [t.detach().float().requires_grad_() for t in (x, ws[0], ws[1], wd)]
    ref = sparse_gated_mlp_reference(*args32, index)
    ref_grads = torch.autograd.grad(ref, args32, go.float())
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, atol=5e-2 * r.abs().max().item(), rtol=5e-2)
    omitted = torch.ones(inter, dtype=torch.bool, device=dev)
    omitted[index] = False
    assert torch.count_nonzero(grads[1][omitted]) == 0 and torch.count_nonzero(grads[3][:, omitted]) == 0


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("tokens,hidden,inter", [(1000, 123, 344), (8192, 2048, 8192)])
def test_sparse_gated_mlp_fused_bf16(activation, tokens, hidden, inter):
    """The gathered-GEMM SAT MLP (Triton packed activation, fp32 weight gradients) under bf16 autocast
    with fp32 master weights, against the fp32 masked reference: no worse than the per-weight-gather path's error
    (+ 1e-3), omitted gradients exactly zero; the same output when gathering from bf16 copies."""
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(tokens, hidden, device=dev, requires_grad=True)
    ws = [(torch.randn(inter, hidden, device=dev) * hidden**-0.5).requires_grad_() for _ in range(2)]
    wd = (torch.randn(hidden, inter, device=dev) * inter**-0.5).requires_grad_()
    index = torch.randperm(inter, device=dev)[: inter // 2].sort().values
    go = torch.randn(tokens, hidden, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, _ = sparse_gated_mlp_fused(x, ws[0], ws[1], wd, index, activation)
        old = sparse_gated_mlp(x, ws[0], ws[1], wd, index, activation)
        casts = (torch.cat(ws).detach().bfloat16(), wd.detach().bfloat16())
        out_c, _ = sparse_gated_mlp_fused(x, ws[0], ws[1], wd, index, activation, cast_gate_up=casts[0],
                                          cast_down=casts[1])
    assert torch.equal(out, out_c)
    leaves = (x, ws[0], ws[1], wd)
    grads = torch.autograd.grad(out, leaves, go.bfloat16())
    old_grads = torch.autograd.grad(old, leaves, go.bfloat16())
    ref = sparse_gated_mlp_reference(x, ws[0], ws[1], wd, index, activation)
    ref_grads = torch.autograd.grad(ref, leaves, go)
    assert _rel(out.float(), ref) <= _rel(old.float(), ref) + 1e-3
    for g, o, r in zip(grads, old_grads, ref_grads):
        assert g.dtype == r.dtype and _rel(g, r) <= _rel(o, r) + 1e-3
    omitted = torch.ones(inter, dtype=torch.bool, device=dev)
    omitted[index] = False
    assert torch.count_nonzero(grads[1][omitted]) == 0 and torch.count_nonzero(grads[3][:, omitted]) == 0


def test_sat_model_matches_masked_oracle_on_cuda():
    model = tiny_model("llama", num_hidden_layers=3, attn_implementation="sdpa").cuda()
    oracle = copy.deepcopy(model)
    enable_sat(model, sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_schedule="constant",
               sat_exempt_layers="", sat_refresh_interval=0)
    model.train()
    oracle.train()
    ids = random_batch(2, 64, device="cuda")
    sat_step(model, 0, 10)
    model(input_ids=ids, labels=ids)
    sat_step(model, 1, 10)
    loss = model(input_ids=ids, labels=ids).loss
    ctrl = controller(model)
    with torch.no_grad():
        for mlp, layer in zip(ctrl.mlps, oracle.model.layers):
            om = torch.ones(mlp._sat_state.units, dtype=torch.bool, device="cuda")
            om[mlp._sat_state.index] = False
            layer.mlp.down_proj.weight[:, om] = 0
        for attn, layer in zip(ctrl.attns, oracle.model.layers):
            st = attn._sat_state
            om = torch.ones(st.units, dtype=torch.bool, device="cuda")
            om[st.index] = False
            q_om, _ = head_rows(om.nonzero().squeeze(1), st.n_rep, st.head_dim)
            layer.self_attn.o_proj.weight[:, q_om] = 0
    torch.testing.assert_close(loss, oracle(input_ids=ids, labels=ids).loss, atol=1e-4, rtol=1e-4)
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, fused=True)
    w = ctrl.mlps[0].gate_proj.weight
    om = torch.ones(w.shape[0], dtype=torch.bool, device="cuda")
    om[ctrl.mlps[0]._sat_state.index] = False
    before = w.detach().clone()
    with frozen_omitted(model, opt):
        opt.step()
    assert torch.equal(w[om], before[om]) and not torch.equal(w[~om], before[~om])
