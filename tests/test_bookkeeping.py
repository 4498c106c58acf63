"""`litespark_hf.bookkeeping`: the per-step Trainer / TRL bookkeeping done once leaves the model exactly as TRL's and
PEFT's own code does (flags, adapter state, requires_grad, outputs), falls back to it where it does not apply, and
undoes its swaps."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import random_batch, tiny_model
from trl.models.utils import disable_gradient_checkpointing as trl_disable_gc
from trl.trainer import dpo_trainer as trl_dpo
from trl.trainer.utils import use_adapter as trl_use_adapter

from litespark_hf import bookkeeping as B


def _lora_model(seed=0, **kw):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"], init_lora_weights=False,
                     **kw)
    return get_peft_model(tiny_model("llama", seed=seed), cfg)


def _state(model):
    """Everything the adapter toggling touches: each tuner layer's disabled flag, every parameter's
    requires_grad, the PeftModel's own flag."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return ([m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer)],
            [(n, p.requires_grad) for n, p in model.named_parameters()], model._adapters_disabled)


def _gc_flags(model):
    return [(n, m.gradient_checkpointing) for n, m in model.named_modules() if hasattr(m, "gradient_checkpointing")]


def test_checkpointing_off_inside_and_back_exactly():
    model = tiny_model("llama")
    model.gradient_checkpointing_enable()
    model.model.layers[1].gradient_checkpointing = False  # e.g. checkpoint_layers' plan, or every_n_layers
    before, funcs = _gc_flags(model), [m._gradient_checkpointing_func for m in model.model.layers]
    hooks = len(model.get_input_embeddings()._forward_hooks)
    off = B.gradient_checkpointing_off({})
    with off(model, None):
        assert not any(flag for _, flag in _gc_flags(model))
    assert _gc_flags(model) == before
    assert [m._gradient_checkpointing_func for m in model.model.layers] == funcs
    assert len(model.get_input_embeddings()._forward_hooks) == hooks  # no input-grad hook re-registered
    with pytest.raises(RuntimeError):  # restored on an exception too
        with off(model, None):
            raise RuntimeError("boom")
    assert _gc_flags(model) == before


def test_checkpointing_off_matches_trl_for_whole_model_checkpointing():
    a, b = tiny_model("llama"), tiny_model("llama")
    for m in (a, b):
        m.gradient_checkpointing_enable()
    with trl_disable_gc(a, None), B.gradient_checkpointing_off({})(b, None):
        assert _gc_flags(a) == _gc_flags(b)
    assert _gc_flags(a) == _gc_flags(b)
    plain = tiny_model("llama")  # checkpointing off: nothing to do
    with B.gradient_checkpointing_off({})(plain, None):
        assert not any(f for _, f in _gc_flags(plain))


def test_adapters_off_same_state_and_outputs_as_peft():
    stock, fast = _lora_model(), _lora_model()
    fast.load_state_dict(stock.state_dict())
    ids = random_batch()
    with torch.no_grad():
        with_adapters = fast(input_ids=ids).logits
    use = B.use_adapter_fast({}, trl_use_adapter)
    with torch.no_grad(), trl_use_adapter(stock, None), use(fast, None):
        assert _state(stock) == _state(fast)
        assert all(_state(fast)[0]) and fast._adapters_disabled
        ref_stock, ref_fast = stock(input_ids=ids).logits, fast(input_ids=ids).logits
    assert torch.equal(ref_stock, ref_fast)
    assert not torch.allclose(ref_fast, with_adapters)  # the adapters were really off (init_lora_weights=False)
    assert _state(stock) == _state(fast)
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids).logits, with_adapters)  # and on again


def test_adapters_off_keeps_peft_warnings_and_irregular_rule():
    stock, fast = _lora_model(), _lora_model()
    for m in (stock, fast):  # one layer disabled by hand: PEFT warns, and re-enables everything afterwards
        next(x for x in m.modules() if hasattr(x, "lora_A") and hasattr(x, "enable_adapters")).enable_adapters(False)
    use = B.use_adapter_fast({}, trl_use_adapter)
    for ctx, model in ((trl_use_adapter, stock), (use, fast)):
        with pytest.warns(UserWarning, match="some adapter layers that are enabled and others"):
            with ctx(model, None):
                pass
    assert _state(stock) == _state(fast)
    assert not any(_state(fast)[0])


def test_adapters_off_falls_back_for_named_adapters_and_non_peft():
    calls = []

    def stock(model, name):
        calls.append(name)
        return trl_use_adapter(model, name)

    model = _lora_model()
    model.add_adapter("ref", LoraConfig(r=2, target_modules=["q_proj"]))
    with B.use_adapter_fast({}, stock)(model, "ref"):
        assert model.active_adapter == "ref"
    assert calls == ["ref"] and model.active_adapter == "default"
    assert B._peft_adapter_layers({}, tiny_model("llama")) is None  # not a PEFT model


def test_step_context_swaps_and_restores(monkeypatch):
    originals = {k: trl_dpo.__dict__[k] for k in ("disable_gradient_checkpointing", "use_adapter", "is_peft_model")}
    unwraps = []
    acc = types.SimpleNamespace(unwrap_model=lambda m, *a, **k: unwraps.append(m) or m)
    trainer = types.SimpleNamespace(accelerator=acc)
    model = tiny_model("llama")
    with pytest.raises(ValueError):
        with B.step_context(trainer):
            for k, v in originals.items():
                assert trl_dpo.__dict__[k] is not v
            assert acc.unwrap_model(model) is model and acc.unwrap_model(model) is model
            assert len(unwraps) == 1  # the second answer came from the memo
            assert trl_dpo.is_peft_model(model) is False
            raise ValueError("boom")
    assert {k: trl_dpo.__dict__[k] for k in originals} == originals
    assert "unwrap_model" in acc.__dict__ and acc.unwrap_model(model) is model and len(unwraps) == 2
    B.reset(trainer)
    assert B._MEMO not in trainer.__dict__


def test_floating_point_ops_same_value_counted_once(monkeypatch):
    from transformers import Trainer, TrainingArguments

    model = _lora_model()
    trainer = Trainer(model=model, args=TrainingArguments(output_dir="/tmp/bk", use_cpu=True, report_to=[]))
    inputs = {"input_ids": random_batch()}
    expected = trainer.floating_point_ops(inputs)
    counted = []
    real = model.num_parameters

    def counting(*a, **k):
        counted.append(1)
        return real(*a, **k)

    monkeypatch.setattr(model, "num_parameters", counting, raising=False)
    got = [B.floating_point_ops(trainer, inputs, trainer.floating_point_ops) for _ in range(3)]
    assert got == [expected] * 3 and expected > 0
    assert len(counted) == 1
    assert model.__dict__["num_parameters"] is counting  # the instance attribute put back
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert B.parameters(trainer, model) == list(model.parameters())


def test_lean_model_calls_train_and_zero_grad():
    model = _lora_model()
    params = list(model.parameters())
    with B.lean_model_calls(model):
        model.eval()  # the stock path: every module to eval
        assert not any(m.training for m in model.modules())
        model.train()  # not all training: the stock path sets them
        assert all(m.training for m in model.modules())
        for p in params:
            p.grad = torch.ones_like(p)
        model.zero_grad()
        assert all(p.grad is None for p in params)
        for p in params:
            p.grad = torch.ones_like(p)
        model.zero_grad(set_to_none=False)  # the stock path: zeros kept
        assert all(p.grad is not None and not p.grad.any() for p in params)
        model.base_model.model.model.layers[0].training = False  # set by hand: train() must still put it back
        model.train()
        assert model.base_model.model.model.layers[0].training
    assert "train" not in model.__dict__ and "zero_grad" not in model.__dict__


def test_lean_model_calls_leave_overridden_train_to_the_module():
    model = tiny_model("llama")
    seen = []

    class Custom(torch.nn.Linear):
        def train(self, mode=True):
            seen.append(mode)
            return super().train(mode)

    model.model.extra = Custom(2, 2)
    with B.lean_model_calls(model):
        model.train()
        model.train()
    assert seen == [True, True]  # never skipped


def test_memo_passes_unhashable_arguments_through():
    calls = []
    f = B._memoised({}, "t", lambda m, *a, **k: calls.append(a) or len(calls))
    model = object()
    assert f(model, 1) == 1 and f(model, 1) == 1  # remembered
    assert f(model, [1]) == 2 and f(model, [1]) == 3  # a list argument: called every time
