"""Final-logit soft-capping (Gemma2/Gemma3's ``final_logit_softcapping``) inside the fused linear cross-entropy.

Kernel level (Triton's CPU interpreter, fp32): the chunked Triton path with ``softcap`` against
``fused_linear_cross_entropy_reference`` through autograd, loss, grad_hidden, grad_weight (and grad_bias), with
caps of 30 (Gemma2's) and 5, and logits of standard deviation ~8 so that tanh saturates for the small cap.
Model level (fp32, CPU): tiny Gemma2 / Gemma3 text models with a final-logit soft-cap train on the fused loss (no
stock loss, no logits, no warning), with the loss and every parameter gradient within 1e-4 of stock
transformers; a multimodal Gemma3 with the cap only on its text config keeps the stock loss (warned).
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

import litespark_hf
import litespark_kernels
from litespark_kernels.ops._fused_linear_cross_entropy_triton import fused_linear_cross_entropy_triton
from litespark_kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_reference
from tiny_models import VOCAB

OPTS = {"chunk_rows": 96, "block_v": 256}  # several chunks (the last one partial) and vocabulary blocks


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(lead, hidden_size, vocab, logit_std=8.0, bias=False, ignored=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, hidden_size, generator=g)
    w = torch.randn(vocab, hidden_size, generator=g) * (logit_std / hidden_size**0.5)
    b = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, lead, generator=g)
    labels[torch.rand(lead, generator=g) < ignored] = -100
    return h, w, b, labels


def _run(fn, h, w, b, **kw):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    loss = fn(h, w, bias=b, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _triton(*args, **kw):
    return fused_linear_cross_entropy_triton(*args, _options=OPTS, **kw)


def _check(got, want, tol=2e-5):
    for name, a, r in zip(["loss", "grad_hidden", "grad_weight", "grad_bias"], got, want):
        if r is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all() and a.shape == r.shape and a.dtype == r.dtype, name
        assert _rel(a, r) < tol, f"{name}: relative error {_rel(a, r):.2e}"


# ---------------------------------------------------------------------------------------------------------------
# The op
# ---------------------------------------------------------------------------------------------------------------

def test_reference_is_transformers_order_and_dtype():
    """The reference caps as Gemma2ForCausalLM does (divide, tanh, multiply on the head's bf16 output), then the
    loss upcasts: bit for bit."""
    h, w, _, labels = _inputs((2, 40), 32, 300, seed=1)
    h, w = h.bfloat16(), w.bfloat16()
    logits = F.linear(h, w)
    logits = logits / 5.0
    logits = torch.tanh(logits)
    logits = logits * 5.0
    shift = F.pad(labels, (0, 1), value=-100)[:, 1:]
    want = F.cross_entropy(logits.float().reshape(-1, 300), shift.reshape(-1), ignore_index=-100)
    assert torch.equal(fused_linear_cross_entropy_reference(h, w, labels, softcap=5.0), want)
    assert not torch.equal(fused_linear_cross_entropy_reference(h, w, labels), want)  # the cap matters here


@pytest.mark.parametrize("cap,lead,ignored", [(30.0, (2, 500), 0.5), (5.0, (1, 357), 0.2)])
def test_triton_softcap_matches_reference(cap, lead, ignored):
    """1000 tokens (2 x 500, half ignored) or 357, odd hidden 123 and vocabulary 701: several chunks of 96 rows (the
    last one partial) and vocabulary blocks of 256 (the last one partial)."""
    h, w, _, labels = _inputs(lead, 123, 701, ignored=ignored, seed=2)
    labels[-1, 300:] = -100  # right padding
    want = _run(fused_linear_cross_entropy_reference, h, w, None, labels=labels, softcap=cap)
    got = _run(_triton, h, w, None, labels=labels, softcap=cap)
    _check(got, want)
    plain = _run(fused_linear_cross_entropy_reference, h, w, None, labels=labels)
    assert _rel(plain[1], want[1]) > 1e-2  # the cap changes the gradients: the check above is not vacuous
    assert got[1][-1, 299:].abs().max() == 0


def test_triton_softcap_bias_num_items_and_grad_output():
    """Bias, a tensor num_items_in_batch (gradient accumulation) and a grad_output other than 1, all rows kept."""
    h, w, b, labels = _inputs((3, 70), 40, 333, bias=True, ignored=0.0, seed=3)
    num_items = torch.tensor(500)

    def scaled(fn):
        return lambda *a, **kw: 0.5 * fn(*a, **kw)

    want = _run(scaled(fused_linear_cross_entropy_reference), h, w, b, shift_labels=labels,
                num_items_in_batch=num_items, softcap=5.0)
    got = _run(scaled(_triton), h, w, b, shift_labels=labels, num_items_in_batch=num_items, softcap=5.0)
    _check(got, want)


def test_triton_softcap_no_grad_and_frozen_weight():
    h, w, _, labels = _inputs((2, 60), 24, 200, seed=4)
    with torch.no_grad():
        got = _triton(h, w, labels, softcap=5.0)
    want = fused_linear_cross_entropy_reference(h, w, labels, softcap=5.0)
    assert got.grad_fn is None and abs(got.item() - want.item()) < 1e-5 * want.item()
    hr, ht = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    fused_linear_cross_entropy_reference(hr, w, labels, softcap=5.0).backward()
    _triton(ht, w, labels, softcap=5.0).backward()
    assert w.grad is None and _rel(ht.grad, hr.grad) < 2e-5
    with pytest.raises(ValueError, match="softcap"):
        _triton(h, w, labels, softcap=0.0)


@pytest.mark.filterwarnings("ignore:.*inputs are not on a CUDA device")
def test_dispatcher_forced_triton_default_chunks(monkeypatch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    h, w, b, labels = _inputs((2, 50), 36, 190, bias=True, seed=5)
    want = _run(fused_linear_cross_entropy_reference, h, w, b, labels=labels, softcap=30.0)
    got = _run(litespark_kernels.fused_linear_cross_entropy, h, w, b, labels=labels, softcap=30.0)
    _check(got, want)
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "0")  # the CPU reference path takes the cap too
    _check(_run(litespark_kernels.fused_linear_cross_entropy, h, w, b, labels=labels, softcap=30.0), want, 1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The models
# ---------------------------------------------------------------------------------------------------------------

TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=48, sliding_window=6,
    layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128, tie_word_embeddings=True,
    pad_token_id=0, hidden_activation="gelu_pytorch_tanh",
)
STOCK_ATTENTION = {"gemma2": "eager", "gemma3_text": "sdpa"}


def _pair(family, cap, **overrides):
    config = AutoConfig.for_model(family, **{**TEXT, **overrides, "final_logit_softcapping": cap})
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(config, attn_implementation=STOCK_ATTENTION[family]).float()
    with torch.no_grad():  # the final norm's gain (1 + w) raised to 40: logits of std ~6, so that a cap of 3 bites
        stock.model.norm.weight.fill_(39.0)
    lit = litespark_hf.apply(copy.deepcopy(stock))
    return stock, lit


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


class _LossSpy:
    """Records the ``softcap`` of every fused-loss call."""

    def __init__(self, monkeypatch):
        self.caps = []
        real = litespark_kernels.fused_linear_cross_entropy

        def spy(*args, **kwargs):
            self.caps.append(kwargs.get("softcap"))
            return real(*args, **kwargs)

        monkeypatch.setattr(litespark_kernels, "fused_linear_cross_entropy", spy)


def _assert_grads_match(stock, lit, tol=1e-4):
    for (name, pa), pb in zip(stock.named_parameters(), lit.parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        assert _rel(pb.grad, pa.grad) <= tol, name


def _train_step_matches_stock(stock, lit, monkeypatch, expect_cap):
    from litespark_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "_WARNED", set())
    spy = _LossSpy(monkeypatch)
    stock.train(), lit.train()
    inputs = _batch()
    out_a = stock(**inputs)
    import warnings

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out_b = lit(**inputs)
    assert not any("final_logit_softcapping" in str(w.message) for w in record)
    assert spy.caps == [expect_cap]  # the fused loss ran, with the model's cap
    assert out_b.logits is None  # no [tokens, vocab] logits
    assert abs(out_a.loss.item() - out_b.loss.item()) <= 1e-5 * out_a.loss.item()
    out_a.loss.backward()
    out_b.loss.backward()
    _assert_grads_match(stock, lit)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("family,cap", [("gemma2", 3.0), ("gemma2", 30.0), ("gemma3_text", 3.0)])
def test_softcapped_model_trains_on_the_fused_loss(family, cap, monkeypatch):
    stock, lit = _pair(family, cap, **({"attn_logit_softcapping": 5.0} if family == "gemma2" else {}))
    _train_step_matches_stock(stock, lit, monkeypatch, cap)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_softcapped_gemma3_with_triton_kernels(monkeypatch):
    """Every kernel in Triton's interpreter, the fused loss's soft-cap included (Gemma2's runs in
    tests/test_families_gemma.py)."""
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    stock, lit = _pair("gemma3_text", 3.0, hidden_size=128)
    _train_step_matches_stock(stock, lit, monkeypatch, 3.0)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_multimodal_gemma3_with_a_text_cap_keeps_the_stock_loss(monkeypatch):
    """Gemma3ForConditionalGeneration's stock forward does not read its text config's cap (transformers 5.23):
    Litespark neither adds it nor guesses: the stock loss runs, warned once, and matches stock."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from litespark_kernels import _dispatch

    text = {**TEXT, "final_logit_softcapping": 3.0}
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=120,
                          boi_token_index=121, eoi_token_index=122)
    torch.manual_seed(0)
    stock = Gemma3ForConditionalGeneration(config).float()
    stock.set_attn_implementation("sdpa")
    lit = litespark_hf.apply(copy.deepcopy(stock))
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    spy = _LossSpy(monkeypatch)
    stock.train(), lit.train()
    inputs = _batch()
    la = stock(**inputs).loss
    with pytest.warns(UserWarning, match="final_logit_softcapping=3.0"):
        lb = lit(**inputs).loss
    assert spy.caps == []
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
