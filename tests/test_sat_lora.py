"""SAT on PEFT LoRA projections (issue #19: SAT with the post-training paths). The oracle: a LoRA projection
computes ``W + scaling * B @ A`` applied to its input, so SAT on the LoRA model must give the losses of SAT on the
same model with its adapters merged (same selection), and the adapters' gradients must be that merged weight's
gradient taken through ``B @ A``: ``dB = s * dW @ A^T``, ``dA = s * B^T @ dW``. The cut adapter rows (lora_B of
gate/up/q/k/v) and columns (lora_A of down/o) get exactly zero gradient and stay bit-for-bit frozen in the step."""

import copy
import warnings

import pytest
import torch

import litespark_hf
from litespark_hf.sat import core
from tiny_models import tiny_model

peft = pytest.importorskip("peft")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SAT = dict(sat_omission_rate_mlp=0.5, sat_omission_rate_heads=0.5, sat_schedule="constant", sat_exempt_layers="",
           cuda_graphs=False)


def _pair(metric="random"):
    base = tiny_model("llama", num_hidden_layers=2, num_key_value_heads=4, attn_implementation="sdpa")
    torch.manual_seed(0)
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(PROJ),
                                                     lora_dropout=0.0, init_lora_weights=False))
    merged = copy.deepcopy(lora).merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(True)
    for m in (lora, merged):
        litespark_hf.apply(m, sat_metric=metric, **SAT)
    return lora, merged


def _projections(model):
    for layer in model.base_model.model.model.layers:
        for owner in (layer.self_attn, layer.mlp):
            for name in PROJ:
                if hasattr(owner, name):
                    yield owner, name, getattr(owner, name)


def _merged_projection(merged, owner_path):
    return merged.get_submodule(owner_path)


def _step(model, ids):
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert not [w for w in caught if "SAT needs" in str(w.message)], [str(w.message) for w in caught]
    return loss.detach()


@pytest.mark.parametrize("metric", ["random", "activation_magnitude"])
def test_sat_on_lora_equals_sat_on_the_merged_weights(metric):
    lora, merged = _pair(metric)
    ids = torch.randint(0, lora.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1))
    for step in range(2):  # activation_magnitude: step 0 is the dense measuring step, step 1 selects
        for m in (lora, merged):
            core.sat_step(m, step, 4)
        sel = [[None if x._sat_state.index is None else x._sat_state.index for x in core.controller(m).modules]
               for m in (lora, merged)]
        for a, b in zip(*sel):
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b))
        sparse = any(x is not None for x in sel[0])
        assert sparse == (metric == "random" or step == 1)
        lo, me = _step(lora, ids), _step(merged, ids)
        torch.testing.assert_close(lo, me, rtol=1e-5, atol=0)
        if metric == "activation_magnitude" and step == 0:  # the measurements agree too
            for a, b in zip(core.controller(lora).modules, core.controller(merged).modules):
                torch.testing.assert_close(a._sat_state.acc, b._sat_state.acc, rtol=1e-4, atol=1e-7)
        for i, layer in enumerate(lora.base_model.model.model.layers):
            mlayer = merged.model.layers[i]
            for owner, mowner in ((layer.self_attn, mlayer.self_attn), (layer.mlp, mlayer.mlp)):
                for name in PROJ:
                    if not hasattr(owner, name):
                        continue
                    proj, dw = getattr(owner, name), getattr(mowner, name).weight.grad
                    a, b = proj.lora_A["default"].weight, proj.lora_B["default"].weight
                    s = proj.scaling["default"]
                    torch.testing.assert_close(b.grad, s * dw @ a.t(), rtol=1e-4, atol=1e-6)
                    torch.testing.assert_close(a.grad, s * b.t() @ dw, rtol=1e-4, atol=1e-6)
                    assert proj.base_layer.weight.grad is None  # the base stays frozen
        for m in (lora, merged):
            m.zero_grad(set_to_none=True)


def test_cut_adapter_rows_and_columns_get_zero_gradients_and_stay_frozen():
    lora, _ = _pair()
    ids = torch.randint(0, lora.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(3):
        core.sat_step(lora, step, 3)
        _step(lora, ids)
        cuts = []
        for m in core.controller(lora).modules:
            st = m._sat_state
            if st.kind == "mlp":
                cuts += [(m.gate_proj.lora_B["default"].weight, 0, st.omitted),
                         (m.up_proj.lora_B["default"].weight, 0, st.omitted),
                         (m.down_proj.lora_A["default"].weight, 1, st.omitted)]
            else:
                q_om, kv_om = st.omitted_rows
                cuts += [(m.q_proj.lora_B["default"].weight, 0, q_om), (m.k_proj.lora_B["default"].weight, 0, kv_om),
                         (m.v_proj.lora_B["default"].weight, 0, kv_om), (m.o_proj.lora_A["default"].weight, 1, q_om)]
        assert cuts and all(om.numel() for _, _, om in cuts)
        for p, dim, om in cuts:
            assert float(p.grad.index_select(dim, om).abs().max()) == 0.0
        before = [(p, dim, om, p.detach().index_select(dim, om).clone(), p.detach().clone()) for p, dim, om in cuts]
        with core.frozen_omitted(lora, opt):
            opt.step()
        opt.zero_grad(set_to_none=True)
        for p, dim, om, frozen, whole in before:
            assert torch.equal(p.detach().index_select(dim, om), frozen)  # the cut slices: untouched
            assert not torch.equal(p.detach(), whole)  # the kept ones trained


def test_disabled_adapters_run_dense_without_a_warning():
    """DPO's reference pass of a LoRA model (adapters disabled, training mode): the base model, dense, as the
    reference model of a full DPO run; no 'SAT needs' warning."""
    lora, _ = _pair()
    ids = torch.randint(0, lora.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    core.sat_step(lora, 0, 4)
    assert any(m._sat_state.index is not None for m in core.controller(lora).modules)
    lora.train()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), lora.disable_adapter():
        warnings.simplefilter("always")
        ref = lora(input_ids=ids).logits
    assert not [w for w in caught if "SAT needs" in str(w.message)]
    plain = copy.deepcopy(lora.base_model.model)  # the same weights without SAT and without adapters
    litespark_hf.restore(plain)
    with torch.no_grad():
        for layer in plain.model.layers:
            for owner in (layer.self_attn, layer.mlp):
                for name in PROJ:
                    if hasattr(owner, name):
                        setattr(owner, name, getattr(owner, name).base_layer)
        want = plain(input_ids=ids).logits
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)
