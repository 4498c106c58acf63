"""Model features the `litespark` attention backend does not implement are honoured (on a reference path) or refused,
never ignored: Gemma2's attention logit soft-capping, GPT-OSS's attention sinks, masks built outside the attention
call, unknown attention arguments, ALiBi and models that bypass transformers' AttentionInterface."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import litespark_hf
from litespark_hf.attention import UnsupportedAttentionFeatureError, litespark_attention_forward

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def _model(model_type: str, **kwargs):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, **{**COMMON, **kwargs})
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()


def _batch():
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    return ids, mask


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _logits_and_grads(model, ids, mask, params):
    model.zero_grad()
    out = model(ids, attention_mask=mask)
    keep = mask.bool()
    loss = out.logits[keep].float().logsumexp(-1).mean()
    loss.backward()
    return out.logits.detach()[keep], [p.grad.clone() for p in params]


def _partial_apply(model):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        litespark_hf.apply(model, allow_partial=True)
    assert model.config._attn_implementation == "litespark"
    return caught


def test_gemma2_soft_capping_and_scaling_are_honoured():
    # A small cap (5.0; Gemma2's default is 50) makes the capping change the logits a lot; query_pre_attn_scalar=12
    # gives a scale that is not head_dim ** -0.5.
    model = _model("gemma2", sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=None,
                   query_pre_attn_scalar=12, hidden_activation="gelu_pytorch_tanh")
    with torch.no_grad():  # scores of a trained model's size (a random init's are far below the cap)
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10.0)
    model.train()  # no dropout in Gemma2's attention; train mode as in a Trainer step
    ids, mask = _batch()
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.layers[1].self_attn.k_proj.weight]
    ref_logits, ref_grads = _logits_and_grads(model, ids, mask, params)

    # Sensitivity: the same model without soft-capping differs by far more than the tolerance below.
    attns = [layer.self_attn for layer in model.model.layers]
    for attn in attns:
        attn.attn_logit_softcapping = None
    with torch.no_grad():
        uncapped = model(ids, attention_mask=mask).logits[mask.bool()]
    for attn in attns:
        attn.attn_logit_softcapping = 5.0
    assert _rel(uncapped, ref_logits) > 1e-3

    caught = _partial_apply(model)
    logits, grads = _logits_and_grads(model, ids, mask, params)
    assert _rel(logits, ref_logits) < 1e-5
    for g, ref in zip(grads, ref_grads):
        assert _rel(g, ref) < 1e-4
    messages = [str(w.message) for w in caught]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from litespark_kernels import _dispatch
        from litespark_kernels.ops.attention import SOFTCAP_FALLBACK

        # head dim 16 on CPU: the kernel does not take these inputs, the explicit-math reference runs (warned once)
        _dispatch._WARNED.discard(("attention", SOFTCAP_FALLBACK))
        model(ids, attention_mask=mask)
    messages += [str(w.message) for w in caught]
    assert any("soft-capping" in m and "PyTorch reference" in m for m in messages)

    # generation (KV cache: transformers' 4D mask) follows the same path
    model.eval()
    litespark_hf.restore(model)
    with torch.no_grad():
        want = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    _partial_apply(model)
    with torch.no_grad():
        got = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_gpt_oss_attention_sinks_are_honoured():
    model = _model("gpt_oss", sliding_window=8, num_local_experts=4, num_experts_per_tok=2)
    attns = [layer.self_attn for layer in model.model.layers]
    with torch.no_grad():
        for attn in attns:  # sinks large enough to matter (the init is N(0, 0.02))
            attn.sinks.copy_(torch.linspace(-1.0, 2.0, attn.sinks.numel()))
    model.train()
    ids, mask = _batch()
    params = [attns[0].sinks, attns[1].sinks, attns[0].q_proj.weight]
    ref_logits, ref_grads = _logits_and_grads(model, ids, mask, params)

    saved = [attn.sinks.detach().clone() for attn in attns]
    with torch.no_grad():
        for attn in attns:  # a sink at -inf takes nothing: attention without sinks
            attn.sinks.fill_(-1e9)
        no_sinks = model(ids, attention_mask=mask).logits[mask.bool()]
        for attn, s in zip(attns, saved):
            attn.sinks.copy_(s)
    assert _rel(no_sinks, ref_logits) > 1e-3

    _partial_apply(model)
    logits, grads = _logits_and_grads(model, ids, mask, params)
    assert _rel(logits, ref_logits) < 1e-5
    for g, ref in zip(grads, ref_grads):
        assert _rel(g, ref) < 1e-4


def test_a_window_built_into_the_mask_only_is_honoured():
    # PhiMoE builds a sliding-window mask but does not pass the window to its attention function; the backend's fast
    # path (2D padding mask, window from the call) would attend past the window.
    model = _model("phimoe", sliding_window=4, num_local_experts=4, num_experts_per_tok=2)
    model.eval()
    ids, _ = _batch()
    with torch.no_grad():
        ref = model(ids).logits
    _partial_apply(model)
    with torch.no_grad():
        out = model(ids).logits
    assert _rel(out, ref) < 1e-5


def _qkv(batch=2, seq=8):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, 4, seq, 16, generator=g)
    k = torch.randn(batch, 2, seq, 16, generator=g)
    v = torch.randn(batch, 2, seq, 16, generator=g)
    return q, k, v


def test_unknown_attention_arguments_are_refused_and_known_ones_accepted():
    module = torch.nn.Module()
    q, k, v = _qkv()
    with pytest.raises(UnsupportedAttentionFeatureError, match=r"position_bias=<tensor \(2, 4, 8, 8\)"):
        litespark_attention_forward(module, q, k, v, None, position_bias=torch.zeros(2, 4, 8, 8))
    with pytest.raises(UnsupportedAttentionFeatureError, match="block_indices"):
        litespark_attention_forward(module, q, k, v, None, block_indices=[0, 1])
    # what transformers' decoder models and the Trainer pass along, and None-valued features, are fine
    out, _ = litespark_attention_forward(
        module, q, k, v, None, dropout=0.0, scaling=0.25, sliding_window=None, is_causal=True,
        position_ids=torch.arange(8)[None], use_cache=False, num_items_in_batch=torch.tensor(10),
        output_attentions=False, cache_position=torch.arange(8), softcap=None, s_aux=None, position_bias=None,
    )
    assert out.shape == (2, 8, 4, 16)
    # packed-document descriptors the backend cannot use for this call are refused, not dropped
    with pytest.raises(UnsupportedAttentionFeatureError, match="cu_seq_lens_q"):
        litespark_attention_forward(module, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 3, 8]))


def test_seq_idx_packing_is_honoured():
    module = torch.nn.Module()
    q, k, v = _qkv(batch=1)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]], dtype=torch.int32)
    want, _ = litespark_attention_forward(module, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 3, 8]))
    got, _ = litespark_attention_forward(module, q, k, v, None, seq_idx=seq_idx)
    plain, _ = litespark_attention_forward(module, q, k, v, None)
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(plain, want, atol=1e-3)


def test_partial_apply_refuses_alibi_and_models_outside_the_attention_interface():
    falcon = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "falcon", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, alibi=True))
    with pytest.raises(litespark_hf.UnsupportedArchitectureError, match="ALiBi"):
        litespark_hf.apply(falcon, allow_partial=True)
    bloom = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "bloom", hidden_size=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(litespark_hf.UnsupportedArchitectureError, match="does not route its attention"):
        litespark_hf.apply(bloom, allow_partial=True)
    assert not litespark_hf.is_applied(bloom) and bloom.config._attn_implementation != "litespark"


def test_triton_interpret_alone_says_that_the_kernels_need_force_triton(monkeypatch):
    # (kernel dispatch, not attention: the one-time fallback warning when TRITON_INTERPRET=1 is set on its own)
    from litespark_kernels import _dispatch

    if not _dispatch.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("LITESPARK_FORCE_TRITON", raising=False)
    monkeypatch.delenv("LITESPARK_DISABLE_TRITON", raising=False)
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    with pytest.warns(UserWarning, match="set LITESPARK_FORCE_TRITON=1 too"):
        assert not _dispatch.use_triton("test_op", torch.zeros(2))
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    assert _dispatch.use_triton("test_op", torch.zeros(2))


def test_float32_queries_under_autocast_take_the_autocast_dtype_like_sdpa():
    """A q/k norm with float32 weights returns float32 under autocast (Qwen3); SDPA casts such inputs to the autocast
    dtype, so litespark_kernels.attention does too (and the kernel, which takes bf16/fp16, is not bypassed for the
    reference)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 64, generator=g) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = litespark_attention_forward(module, q, k, v, None, scaling=0.125)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.125).transpose(1, 2)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert _rel(out.float(), ref.float()) < 1e-2
    out32, _ = litespark_attention_forward(module, q, k, v, None, scaling=0.125)  # no autocast: stays float32
    assert out32.dtype == torch.float32
