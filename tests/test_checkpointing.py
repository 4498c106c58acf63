"""`LitesparkConfig.checkpoint_layers` (litespark_hf/checkpointing.py): how many decoder layers gradient
checkpointing recomputes. Values equal with any split (fp32, CPU), the plan's arithmetic, the memory-driven
``auto`` choice (the device memory faked: the CPU has none to read), the user's flags given back, and the
per-token bound against what the layers really save."""

import pytest
import torch

import litespark_hf
from litespark_hf import checkpointing as C
from litespark_hf.config import LitesparkConfig
from tiny_models import FAMILIES, DENSE_FAMILIES, MOE_FAMILIES, random_batch, saved_bytes, tiny_config, tiny_model


def _flags(model):
    return [bool(layer.gradient_checkpointing) for layer in model.model.layers]


def _step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("value,parsed", [("auto", "auto"), ("ALL", "all"), ("3", 3), (0, 0), (" 2 ", 2)])
def test_parse_mode(value, parsed):
    assert C.parse_mode(value) == parsed


@pytest.mark.parametrize("value", ["some", "-1", -1, 1.5, True, None, ""])
def test_bad_values_are_one_line_errors(value):
    with pytest.raises(ValueError, match="checkpoint_layers must be 'auto', 'all' or a number of layers"):
        C.parse_mode(value)
    with pytest.raises(ValueError, match="checkpoint_layers"):
        LitesparkConfig(checkpoint_layers=value)


def test_config_default_and_json():
    assert LitesparkConfig().checkpoint_layers == "auto"
    assert LitesparkConfig.from_any('{"checkpoint_layers": 2}').checkpoint_layers == "2"


def test_plan_arithmetic():
    # 10 layers, 1000 tokens, 100 B/token a layer unchecked, 10 B/token checkpointed
    fixed = 1000 * (10 * 10 + 100)  # every boundary + the layer being recomputed
    assert C.plan(10, 1000, 100, 0, fixed + 10 * 1000 * 90, 10) == 0  # room for all
    assert C.plan(10, 1000, 100, 0, fixed + 3 * 1000 * 90 + 5, 10) == 7  # room for three
    assert C.plan(10, 1000, 100, 0, fixed - 1, 10) == 10  # none
    assert C.plan(10, 1000, 100, 5 * 10 ** 9, 10 ** 9, 10) == 10  # the base alone is over the budget
    assert C.plan(10, 0, 100, 0, 10 ** 9, 10) == 10  # no tokens seen: leave it as it is
    # a per-layer weight copy of 9,000 B: each unchecked layer costs 99,000, and the recomputed one 9,000 more
    assert C.plan(10, 1000, 100, 0, fixed + 9000 + 3 * 99000, 10, 9000) == 7
    assert C.plan(10, 1000, 100, 0, fixed + 9000 + 3 * 99000 - 1, 10, 9000) == 8


@pytest.mark.parametrize("recomputed", [0, 1, 3])
def test_any_split_trains_like_full_checkpointing(recomputed):
    """fp32: the losses and every gradient with ``recomputed`` of 4 layers checkpointed equal full checkpointing
    (Litespark) and stock with checkpointing, over 3 optimizer steps."""
    ids = random_batch(batch=2, seq=20)
    runs = {}
    for name, mode in (("stock", None), ("all", "all"), ("split", str(recomputed))):
        model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=4)
        if mode is not None:
            litespark_hf.apply(model, checkpoint_layers=mode)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        steps = []
        for _ in range(3):
            steps.append(_step(model, ids))
            opt.step()
        runs[name] = (steps, _flags(model))
    assert runs["split"][1] == [i < recomputed for i in range(4)]
    assert runs["all"][1] == [True] * 4
    for (l0, g0), (l1, g1), (l2, g2) in zip(runs["stock"][0], runs["all"][0], runs["split"][0]):
        torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(l2, l0, rtol=1e-5, atol=1e-6)
        for k in g0:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(g2[k], g0[k], rtol=1e-4, atol=1e-6)


def test_without_checkpointing_nothing_changes():
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=3)
    litespark_hf.apply(model, checkpoint_layers="1")
    model.train()
    _step(model, random_batch())
    assert _flags(model) == [False] * 3 and litespark_hf.checkpointing.recomputed_layers(model) is None


def test_eval_and_no_grad_forwards_are_left_alone():
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=3)
    litespark_hf.apply(model, checkpoint_layers="0")
    model.gradient_checkpointing_enable()
    model.eval()
    model(input_ids=random_batch())
    model.train()
    with torch.no_grad():
        model(input_ids=random_batch())
    assert _flags(model) == [True] * 3


def _fake_cuda(monkeypatch, total, others=0):
    """The planner's view of a CUDA device with ``total`` bytes (the CPU model's allocation counted as 0)."""
    monkeypatch.setattr(C._Planner, "_placement", lambda self: "whole")
    monkeypatch.setattr(C, "device_memory", lambda device: (total, others, 0))


def test_auto_follows_the_memory(monkeypatch):
    ids = random_batch(batch=2, seq=32)  # 64 tokens
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=4)
    litespark_hf.apply(model)  # checkpoint_layers="auto"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    per_token = C.activation_bytes_per_token(model.config)
    trainable = sum(p.numel() for p in model.parameters())
    base = 4 * trainable + 8 * trainable + min(64, 4096) * model.config.vocab_size * 8 + C.MARGIN_BYTES
    weights = C.layer_weight_bytes(model.model.layers[-1])
    fixed = 64 * (4 * 4 * model.config.hidden_size + per_token) + weights
    gain = 64 * (per_token - 4 * model.config.hidden_size) + weights

    def run(budget):
        _fake_cuda(monkeypatch, int((budget + 1) / C.BUDGET_FRACTION) + 1)
        _step(model, ids)
        return C.recomputed_layers(model), _flags(model)

    assert run(base + fixed + 4 * gain) == (0, [False] * 4)  # a large device: nothing recomputed
    assert run(base + fixed + 1 * gain) == (3, [True, True, True, False])  # one layer's worth of room
    assert run(base) == (4, [True] * 4)  # no room: the user's checkpointing as it was
    # gradient_checkpointing_disable: the planner no longer sets flags
    model.gradient_checkpointing_disable()
    run(base + fixed + 4 * gain)
    assert _flags(model) == [False] * 4
    # enabled again, then restore(): every layer checkpointed, as transformers set it
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    run(base + fixed + 4 * gain)
    assert _flags(model) == [False] * 4
    litespark_hf.restore(model)
    assert _flags(model) == [True] * 4


def test_auto_on_the_cpu_keeps_full_checkpointing():
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=2)
    litespark_hf.apply(model)
    model.gradient_checkpointing_enable()
    model.train()
    _step(model, random_batch())
    assert _flags(model) == [True, True] and C.recomputed_layers(model) == 2


def _stepped_with_checkpointing(layers, mode):
    """A tiny Llama with ``checkpoint_layers=mode`` and transformers' checkpointing on, after one training step."""
    model = tiny_model("llama", attn_implementation="sdpa", num_hidden_layers=layers)
    litespark_hf.apply(model, checkpoint_layers=mode)
    model.gradient_checkpointing_enable()
    model.train()
    _step(model, random_batch())
    return model


def test_all_removes_the_planner_and_reapply_switches():
    model = _stepped_with_checkpointing(2, "0")
    assert _flags(model) == [False, False]
    litespark_hf.apply(model, checkpoint_layers="all")  # the planner gone, transformers' flags back
    assert _flags(model) == [True, True] and C.recomputed_layers(model) is None
    _step(model, random_batch())
    assert _flags(model) == [True, True]


@pytest.mark.parametrize("family", FAMILIES + DENSE_FAMILIES + MOE_FAMILIES)
def test_bound_covers_what_a_layer_saves(family):
    """The per-token bound (fp32 here: compute and residual bytes 4) plus the layer's weight copy against the bytes a
    Litespark decoder layer saves for its backward on the CPU (unique storages seen by a saved-tensor hook over one
    layer's forward, the parameters themselves not counted; the fused projections save their concatenated weights). The CPU attention reference also keeps its [heads, S, S] probabilities, which the GPU
    kernel does not: at S = 16 that is at most heads x 16 x 4 B a token. (For llama the reference path saves more
    than the Triton path under the interpreter: 5,022 against 3,870 B a token besides the weight copy.)"""
    cfg = tiny_config(family)
    model = tiny_model(family)
    litespark_hf.apply(model)
    model.train()
    ids = random_batch(batch=2, seq=16)
    layer = model.model.layers[-1]
    captured = {}

    def grab(module, args, kwargs):
        captured["args"], captured["kwargs"] = args, kwargs

    h = layer.register_forward_pre_hook(grab, with_kwargs=True)
    model(input_ids=ids)
    h.remove()
    args = tuple(a.detach().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in captured["args"])
    kwargs = dict(captured["kwargs"])
    if torch.is_tensor(kwargs.get("hidden_states")):
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = saved_bytes(lambda: layer(*args, **kwargs), params) / ids.numel()
    bound = (C.activation_bytes_per_token(cfg, compute_bytes=4, residual_bytes=4)
             + C.layer_weight_bytes(layer, compute_bytes=4) / ids.numel())
    assert saved > 0
    assert saved <= bound, (family, saved, bound)


def test_plan_keeps_the_estimate_under_the_budget():
    """`plan`'s choice is the most unchecked layers whose `activation_estimate` fits (one more would not)."""
    for budget in (10 ** 6, 3 * 10 ** 6, 7 * 10 ** 6, 2 * 10 ** 7):
        n, t, a, b, w, base = 12, 700, 900, 64, 50_000, 200_000
        r = C.plan(n, t, a, base, budget, b, w)
        u = n - r
        if r < n:
            assert base + C.activation_estimate(n, u, t, a, b, w) <= budget
        if u < n:
            assert base + C.activation_estimate(n, u + 1, t, a, b, w) > budget


def test_restore_keeps_flags_set_by_someone_else():
    model = _stepped_with_checkpointing(3, "0")
    assert _flags(model) == [False] * 3
    model.model.layers[1].gradient_checkpointing = True  # the user's own change after the plan
    litespark_hf.restore(model)
    assert _flags(model) == [False, True, False]
