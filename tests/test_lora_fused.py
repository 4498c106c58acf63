"""PEFT LoRA projections fused into the Litespark projection groups (`litespark_hf.modules.lora`): the same values,
gradients, dropout draws, state dicts, saving and merging as stock PEFT, and the states left to PEFT's modules."""

import contextlib
import copy
from collections import Counter

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

import litespark_hf
import litespark_kernels
from litespark_hf.modules import lora as lora_mod
from litespark_hf.modules import lora_group, original_class
from tiny_models import OpLog, random_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FAMILIES = ("llama", "qwen3", "mistral")
QKV = ("q_proj", "k_proj", "v_proj")


def _config(dropout=0.0, targets="all-linear", **kw):
    # init_lora_weights=False: B is random too, so the adapters change the outputs and every LoRA weight gets a gradient
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=dropout, init_lora_weights=False, **kw)


def _pair(family="llama", dropout=0.0, targets="all-linear", **kw):
    stock = get_peft_model(tiny_model(family), _config(dropout, targets, **kw))
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return stock, lit


def _layers(model):
    return model.base_model.model.model.layers


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _logits(model, ids, seed=0, **kw):
    torch.manual_seed(seed)  # the same dropout draws in both models (train mode)
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


class _Spy:
    """Records the weights of every `litespark_kernels.fused_linear` call (as a tuple of ids), and of every
    one-node group + adapters call (`lora_linear`: the base weights, and the A weights)."""

    def __init__(self, monkeypatch):
        self.calls, self.lora_calls, self.lora_a = Counter(), Counter(), Counter()
        real, real_lora = litespark_kernels.fused_linear, lora_mod.lora_linear

        def spy(x, weights, *args, **kwargs):
            self.calls[tuple(id(w) for w in weights)] += 1
            return real(x, weights, *args, **kwargs)

        def spy_lora(x, weights, biases, a_weights, *args, **kwargs):
            self.lora_calls[tuple(id(w) for w in weights)] += 1
            self.lora_a[tuple(id(w) for w in a_weights)] += 1
            return real_lora(x, weights, biases, a_weights, *args, **kwargs)

        monkeypatch.setattr(litespark_kernels, "fused_linear", spy)
        monkeypatch.setattr(lora_mod, "lora_linear", spy_lora)

    def count(self, *weights):
        return self.calls[tuple(id(w) for w in weights)]

    def group(self, *weights):
        """Calls that ran these base weights as one GEMM, through either path."""
        key = tuple(id(w) for w in weights)
        return self.calls[key] + self.lora_calls[key]

    def adapters(self, *a_weights):
        """One-node calls that ran these adapters' A's together."""
        return self.lora_a[tuple(id(w) for w in a_weights)]


def _train_step(model, ids, seed=0):
    model.train()
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


def _assert_grads_match(stock, lit):
    n = 0
    for (name, a), (name_b, b) in zip(stock.named_parameters(), lit.named_parameters()):
        assert name == name_b
        if a.requires_grad:
            assert "lora_" in name and b.grad is not None and b.grad.abs().sum() > 0, name
            assert _rel(b.grad, a.grad) < 1e-4, name
            n += 1
        else:
            assert b.grad is None, name  # frozen base weights: no weight gradient
    assert n > 0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("family", FAMILIES)
def test_fused_lora_matches_peft(family, dropout, monkeypatch):
    stock, lit = _pair(family, dropout)
    ids = random_batch()
    for m in (stock, lit):
        m.eval()
    assert _rel(_logits(lit, ids), _logits(stock, ids)) < 1e-5
    # train mode: dropout draws each projection's mask in PEFT's order, so equal seeds give equal outputs
    for m in (stock, lit):
        m.train()
    assert _rel(_logits(lit, ids, seed=3), _logits(stock, ids, seed=3)) < 1e-5
    spy = _Spy(monkeypatch)
    losses = [_train_step(m, ids, seed=4) for m in (stock, lit)]
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    _assert_grads_match(stock, lit)
    for layer in _layers(lit):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [getattr(attn, n) for n in QKV]
        assert all(type(m) is LoraLinear for m in qkv)
        assert spy.group(*(m.base_layer.weight for m in qkv)) == 1  # q/k/v base: one GEMM
        assert spy.group(mlp.gate_proj.base_layer.weight, mlp.up_proj.base_layer.weight) == 1
        a_weights = [m.lora_A["default"].weight for m in qkv]
        if dropout == 0.0:  # the group and its three adapters in one node (the A's as one GEMM)
            assert spy.adapters(*a_weights) == 1 and spy.count(*a_weights) == 0
        else:  # independent masks: each A reads its own dropped-out input
            assert all(spy.count(w) == 1 for w in a_weights) and spy.adapters(*a_weights) == 0


def test_fused_lora_fewer_gemms_than_peft():
    """Per layer: stock PEFT makes 3 GEMMs for each of the 7 projections (21); fused, each of the four groups (q/k/v,
    o, gate/up, down) is its base GEMM, its adapters' A's as one GEMM and their B's as one accumulating GEMM: 12."""
    stock, lit = _pair("llama")
    ids = random_batch()
    counts = []
    for m in (stock, lit):
        m.eval()
        with OpLog() as log, torch.no_grad():
            m(input_ids=ids)
        counts.append(log.counts["mm"] + log.counts["addmm"] + log.counts["addmm_"])
    n_layers = len(_layers(lit))
    assert counts == [21 * n_layers + 1, 12 * n_layers + 1]  # + the LM head


def test_lora_on_part_of_a_group(monkeypatch):
    """PEFT's default Llama targets (q and v): k stays plain inside the fused q/k/v GEMM."""
    stock, lit = _pair("llama", targets=["q_proj", "v_proj", "up_proj"])
    ids = random_batch()
    stock.eval(), lit.eval()
    assert _rel(_logits(lit, ids), _logits(stock, ids)) < 1e-5
    spy = _Spy(monkeypatch)
    losses = [_train_step(m, ids) for m in (stock, lit)]
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    _assert_grads_match(stock, lit)
    attn = _layers(lit)[0].self_attn
    assert spy.group(attn.q_proj.base_layer.weight, attn.k_proj.weight, attn.v_proj.base_layer.weight) == 1


def test_state_dict_save_reload_and_merge_unchanged(tmp_path):
    stock, lit = _pair("qwen3")
    ids = random_batch()
    sd_stock, sd_lit = stock.state_dict(), lit.state_dict()
    assert list(sd_stock) == list(sd_lit)
    assert all(torch.equal(sd_stock[k], sd_lit[k]) for k in sd_stock)

    # a few identical training steps on both
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (stock, lit)]
    for step in range(3):
        for m, opt in zip((stock, lit), opts):
            _train_step(m, ids, seed=step)
            opt.step()
            opt.zero_grad()
    for (name, a), (_, b) in zip(stock.named_parameters(), lit.named_parameters()):
        assert _rel(b, a) < 1e-4 if a.requires_grad else torch.equal(a, b), name

    stock.save_pretrained(tmp_path / "stock")
    lit.save_pretrained(tmp_path / "lit")
    from safetensors.torch import load_file

    saved_stock = load_file(tmp_path / "stock" / "adapter_model.safetensors")
    saved_lit = load_file(tmp_path / "lit" / "adapter_model.safetensors")
    assert sorted(saved_stock) == sorted(saved_lit) and all("lora_" in k for k in saved_lit)
    assert all(_rel(saved_lit[k], saved_stock[k]) < 1e-4 for k in saved_stock)

    lit.eval()
    fused = _logits(lit, ids)
    reloaded = PeftModel.from_pretrained(tiny_model("qwen3"), tmp_path / "lit")
    litespark_hf.apply(reloaded)
    reloaded.eval()
    assert torch.equal(_logits(reloaded, ids), fused)

    merged = lit.merge_and_unload()  # the Litespark modules now hold plain Linears: the plain fused path
    assert not any(isinstance(m, LoraLinear) for m in merged.modules())
    assert _rel(_logits(merged, ids), fused) < 1e-5
    stock.eval()
    stock_merged = stock.merge_and_unload()
    assert _rel(_logits(merged, ids), _logits(stock_merged, ids)) < 1e-4


def test_restore_brings_back_stock_modules():
    stock, lit = _pair("mistral")
    litespark_hf.restore(lit)
    assert not any(original_class(m) is not None for m in lit.modules())
    assert [type(m) for m in lit.modules()] == [type(m) for m in stock.modules()]
    ids = random_batch()
    stock.eval(), lit.eval()
    assert torch.equal(_logits(lit, ids), _logits(stock, ids))


def test_disabled_adapters_run_the_fused_base(monkeypatch):
    """``with model.disable_adapter():`` (TRL DPO's reference pass) is the base model: one q/k/v GEMM, no LoRA."""
    stock, lit = _pair("llama", dropout=0.1)
    base = tiny_model("llama")
    litespark_hf.apply(base)
    ids = random_batch()
    spy = _Spy(monkeypatch)
    for m in (stock, lit, base):
        m.train()
    with stock.disable_adapter():
        want = _logits(stock, ids)
    with lit.disable_adapter():
        got = _logits(lit, ids)
        assert lit.training and lit.active_adapters == ["default"]
    assert _rel(got, want) < 1e-5 and _rel(got, _logits(base, ids)) < 1e-5
    attn = _layers(lit)[0].self_attn
    assert spy.count(*(getattr(attn, n).base_layer.weight for n in QKV)) == 1
    assert spy.count(attn.q_proj.lora_A["default"].weight) == 0
    # the same ops as the plain Litespark model (no re-concatenation of the group's output)
    logs = []
    for m, ctx in ((lit, lit.disable_adapter()), (base, contextlib.nullcontext())):
        with ctx, OpLog() as log:
            _logits(m, ids)
        logs.append(log.counts)
    assert logs[0]["cat"] == logs[1]["cat"] and logs[0]["mm"] == logs[1]["mm"]
    # enabled again: the adapters are back
    assert _rel(_logits(lit, ids, seed=1), _logits(stock, ids, seed=1)) < 1e-5


def _assert_left_to_peft(stock, lit, monkeypatch, train=False):
    ids = random_batch()
    attn = _layers(lit)[0].self_attn
    assert lora_group([getattr(attn, n) for n in QKV]) is None
    spy = _Spy(monkeypatch)
    stock.eval(), lit.eval()
    assert _rel(_logits(lit, ids), _logits(stock, ids)) < 1e-5
    assert spy.count(*(getattr(attn, n).base_layer.weight for n in QKV)) == 0  # PEFT's modules ran
    if train:
        losses = [_train_step(m, ids) for m in (stock, lit)]
        assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
        _assert_grads_match(stock, lit)


def test_merged_adapter_is_left_to_peft(monkeypatch):
    stock, lit = _pair("llama")
    stock.merge_adapter()
    lit.merge_adapter()
    _assert_left_to_peft(stock, lit, monkeypatch)
    stock.unmerge_adapter()
    lit.unmerge_adapter()
    ids = random_batch()
    assert _rel(_logits(lit, ids), _logits(stock, ids)) < 1e-5  # fused again


def test_two_active_adapters_are_left_to_peft(monkeypatch):
    stock = get_peft_model(tiny_model("llama"), _config())
    torch.manual_seed(7)
    stock.add_adapter("second", _config(targets=["q_proj", "k_proj", "v_proj"]))
    stock.base_model.set_adapter(["default", "second"])
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    _assert_left_to_peft(stock, lit, monkeypatch, train=True)


def test_switching_to_one_other_adapter_is_fused(monkeypatch):
    stock = get_peft_model(tiny_model("llama"), _config())
    torch.manual_seed(7)
    stock.add_adapter("second", _config(targets=["q_proj", "v_proj"]))
    stock.set_adapter("second")  # k, o and the MLP have no "second": PEFT runs their base layers alone
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    ids = random_batch()
    spy = _Spy(monkeypatch)
    stock.eval(), lit.eval()
    assert _rel(_logits(lit, ids), _logits(stock, ids)) < 1e-5
    attn = _layers(lit)[0].self_attn
    assert spy.group(*(getattr(attn, n).base_layer.weight for n in QKV)) == 1
    assert spy.adapters(attn.q_proj.lora_A["second"].weight, attn.v_proj.lora_A["second"].weight) == 1


def test_dora_is_left_to_peft(monkeypatch):
    stock, lit = _pair("llama", use_dora=True)
    _assert_left_to_peft(stock, lit, monkeypatch, train=True)


def test_hooked_projection_is_left_to_peft(monkeypatch):
    stock, lit = _pair("llama")
    seen = []
    for m in (stock, lit):
        _layers(m)[0].self_attn.k_proj.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    _assert_left_to_peft(stock, lit, monkeypatch)
    assert len(seen) == 2


def test_mixed_batch_adapter_names_is_left_to_peft():
    stock, lit = _pair("llama")
    ids = random_batch()
    stock.eval(), lit.eval()
    names = ["default", "__base__"]
    assert _rel(_logits(lit, ids, adapter_names=names), _logits(stock, ids, adapter_names=names)) < 1e-5


def test_cast_groups_and_input_casting_under_autocast():
    """The frozen base weights join the cast groups (one cast per forward); the norm hands bf16 to the q/k/v and
    gate/up groups only when no dropout multiplies the input; autocast training is at least as close to the fp32
    gradients as stock PEFT's autocast (the GEMMs write the fp32 weight gradients directly)."""
    from litespark_hf.casting import cast_projection_weights, drop_casts

    for dropout in (0.0, 0.1):
        stock, lit = _pair("llama", dropout)
        attn, mlp = _layers(lit)[0].self_attn, _layers(lit)[0].mlp
        groups = attn.litespark_cast_groups()
        assert groups["qkv"] == [getattr(attn, n).base_layer for n in QKV]
        assert groups["o"] == [attn.o_proj.base_layer]
        assert mlp.litespark_cast_groups()["gate_up"] == [mlp.gate_proj.base_layer, mlp.up_proj.base_layer]
        lit.train()
        assert attn.litespark_casts_input() is (dropout == 0.0) and mlp.litespark_casts_input() is (dropout == 0.0)
        lit.eval()
        assert attn.litespark_casts_input() and mlp.litespark_casts_input()  # eval: dropout draws nothing
        with torch.autocast("cpu", dtype=torch.bfloat16):
            given = cast_projection_weights(lit.base_model.model, "cpu")
            assert attn in given and attn.__dict__["_litespark_casts"]["qkv"].dtype == torch.bfloat16
            drop_casts(given)
        ids = random_batch()
        fp32 = copy.deepcopy(stock)
        want = _train_step(fp32, ids)
        losses = []
        for m in (stock, lit):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                losses.append(_train_step(m, ids))
        assert abs(losses[1] - want) < 1e-2 * abs(want) and abs(losses[1] - losses[0]) < 1e-2 * abs(want)
        errors = {"stock": [], "lit": []}
        for (name, r), (_, a), (_, b) in zip(fp32.named_parameters(), stock.named_parameters(),
                                             lit.named_parameters()):
            if r.requires_grad:
                assert b.grad.dtype == torch.float32 and _rel(b.grad, r.grad) < 0.1, name
                errors["stock"].append(_rel(a.grad, r.grad))
                errors["lit"].append(_rel(b.grad, r.grad))
            else:
                assert b.grad is None
        assert sum(errors["lit"]) <= 1.1 * sum(errors["stock"])


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing(dropout):
    """Recomputation replays the same dropout draws (checkpoint restores the RNG state) and the same fused path."""
    stock, lit = _pair("llama", dropout)
    for m in (stock, lit):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()  # as TRL does for PEFT models under gradient checkpointing
    ids = random_batch()
    losses = [_train_step(m, ids) for m in (stock, lit)]
    assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0])
    _assert_grads_match(stock, lit)
