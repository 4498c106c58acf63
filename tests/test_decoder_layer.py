"""The Litespark decoder layer: the attention's residual add fused into the post-attention RMSNorm.

CPU (reference kernels): loss and gradients equal stock's, with and without autocast; the swapped class keeps the
stock class name (FSDP / accelerate wrap policies find decoder layers by name); a hook on the post-attention norm
sends the layer back to the stock forward (the hook still fires); restore brings back the stock class.
"""

import pytest
import torch

import litespark_hf
from litespark_hf import modules as M
from tests.tiny_models import random_batch, tiny_model


def _loss_and_grads(model, ids, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("autocast", [False, True])
def test_fused_residual_layer_matches_stock(family, autocast, monkeypatch):
    ids = random_batch()
    stock = tiny_model(family, attn_implementation="sdpa")
    lit = tiny_model(family, attn_implementation="sdpa")
    litespark_hf.apply(lit)
    layer = lit.model.layers[0]
    assert isinstance(layer, M.LitesparkDecoderLayer)
    assert type(layer).__name__ == type(stock.model.layers[0]).__name__
    calls, plain = [], []
    real, real_plain = M.lk.add_rms_norm, M.lk.rms_norm
    monkeypatch.setattr(M.lk, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(M.lk, "rms_norm", lambda *a, **k: plain.append(1) or real_plain(*a, **k))
    (l0, g0), (l1, g1) = _loss_and_grads(stock, ids, autocast), _loss_and_grads(lit, ids, autocast)
    # both residual adds of every layer fused (the second into the next layer's input norm / the final norm);
    # only the first layer's input norm (and Qwen3's per-head q/k norms) run alone
    assert len(calls) == 2 * len(lit.model.layers)
    assert len(plain) == 1 + (2 * len(lit.model.layers) if family == "qwen3" else 0)
    if autocast:  # same bf16 GEMMs on the same inputs: the loss is bit-identical
        assert torch.equal(l0, l1)
    else:
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for name, g in g0.items():
        err = ((g1[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < (3e-2 if autocast else 1e-4), (name, err)


def test_hook_on_post_norm_takes_the_stock_path_and_restore():
    ids = random_batch()
    lit = tiny_model("llama", attn_implementation="sdpa")
    litespark_hf.apply(lit)
    seen = []
    norm = lit.model.layers[1].post_attention_layernorm
    h = norm.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    ref = tiny_model("llama", attn_implementation="sdpa")
    litespark_hf.apply(ref)
    out, out_ref = lit(input_ids=ids).logits, ref(input_ids=ids).logits
    assert seen == [(*ids.shape, lit.config.hidden_size)]  # the hook fired: the layer ran the stock forward
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    h.remove()
    litespark_hf.restore(lit)
    assert not isinstance(lit.model.layers[0], M.LitesparkDecoderLayer)
    assert M.original_class(lit.model.layers[0]) is None


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_keeps_the_layer_local_fusion_only(reentrant):
    """Under gradient checkpointing the MLP residual add is not handed to the next layer (the recomputed layer must
    save what its first pass saved); training matches stock."""
    ids = random_batch()
    stock = tiny_model("llama", attn_implementation="sdpa")
    lit = tiny_model("llama", attn_implementation="sdpa")
    litespark_hf.apply(lit)
    for m in (stock, lit):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
    (l0, g0), (l1, g1) = _loss_and_grads(stock, ids, False), _loss_and_grads(lit, ids, False)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for name, g in g0.items():
        if g is not None:
            torch.testing.assert_close(g1[name], g, rtol=1e-4, atol=1e-6)
    assert not any("_litespark_prenormed" in m.__dict__ for m in lit.modules())


def test_handoff_only_for_the_same_tensor():
    """A norm given a tensor other than the one its previous layer left a result for computes it itself."""
    lit = tiny_model("llama", attn_implementation="sdpa")
    litespark_hf.apply(lit)
    norm = lit.model.layers[1].input_layernorm
    x = torch.randn(2, 3, lit.config.hidden_size)
    norm.__dict__["_litespark_prenormed"] = (x.clone(), torch.zeros(2, 3, lit.config.hidden_size))
    torch.testing.assert_close(norm(x), M.lk.rms_norm_reference(x, norm.weight, norm.variance_epsilon))
    assert "_litespark_prenormed" not in norm.__dict__
