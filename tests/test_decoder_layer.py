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
    calls = []
    real = M.lk.add_rms_norm
    monkeypatch.setattr(M.lk, "add_rms_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    (l0, g0), (l1, g1) = _loss_and_grads(stock, ids, autocast), _loss_and_grads(lit, ids, autocast)
    assert len(calls) == len(lit.model.layers)
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
