"""Gemma2 / Gemma3 (text, and the text tower of the multimodal Gemma3) with every family quirk on, Litespark vs
stock transformers, float32 on CPU.

Quirks on in the tiny configs: Gemma's ``x * (1 + w)`` RMSNorm (norm weights drawn away from their zero init so
the offset matters), sandwich norms, the sqrt(hidden) embedding scale, tied embeddings (as Gemma ships),
``query_pre_attn_scalar`` != head_dim, sliding windows (6) shorter than the sequences on alternating layers,
GELU-tanh GeGLU, Gemma2's attention logit soft-cap (5.0, so that it bites) and final-logit soft-cap (3.0).
Stock runs eager for Gemma2 (transformers' recommendation; it refuses SDPA) and SDPA for Gemma3.

Criteria (as tests/test_equivalence.py): logits and every parameter gradient within 1e-4 relative (plain,
right/left padded and packed batches), 20 AdamW steps with losses within 1e-3, PEFT LoRA (all-linear) values and
gradients within 1e-4; the norm kernel's ``offset`` (Gemma) mode against its PyTorch reference in Triton's CPU
interpreter (as tests/test_norm_kernels.py) and the reference against transformers' Gemma RMSNorm bit for bit.
"""

import copy
import dataclasses

import pytest
import torch
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM

import litespark_hf
import litespark_kernels
from litespark_hf import ARCHITECTURES, LitesparkConfig
from litespark_hf.architectures import SWAP_KINDS
from litespark_hf.attention import litespark_attention_forward
from litespark_hf.modules import original_class
from litespark_kernels.ops import _rms_norm_triton as rms_mod
from litespark_kernels.ops.rms_norm import add_rms_norm_reference, rms_norm_reference
from tiny_models import VOCAB, OpLog, alternating_padded_batches, rel_err, train_side_by_side

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
TEXT = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=6, layer_types=LAYER_TYPES,
    max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
)
# family -> (config overrides, the stock attn_implementation)
GEMMA = {
    "gemma2": (dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0), "eager"),
    "gemma3_text": (dict(), "sdpa"),
}
FAMILIES = tuple(GEMMA)




def _spread_norm_weights(model, seed=7):
    """Gemma initialises its norm weights to 0 (a gain of 1 + 0): draw them so that the offset and their gradients
    matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def gemma_model(family, attn_implementation=None, seed=0, **overrides):
    quirks, stock_impl = GEMMA[family]
    config = AutoConfig.for_model(family, **{**TEXT, **quirks, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation or stock_impl)
    return _spread_norm_weights(model.float())


def make_pair(family, **overrides):
    stock = gemma_model(family, **overrides)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return stock, lit


def _ids(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=g)


def padded_labels(ids, mask):
    """No pad is a target, and no target is predicted from a pad (see tests/test_equivalence.py)."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


def plain_batch():
    ids = _ids(2, 24, 5)
    return dict(input_ids=ids, labels=ids.clone()), torch.ones_like(ids, dtype=torch.bool)


def padded_batch():
    ids = _ids(3, 24, 1)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, labels=padded_labels(ids, mask)), mask.bool()


def packed_batch():
    lengths = [7, 10, 9]  # three documents in one row, each longer than the sliding window
    ids = _ids(1, sum(lengths), 3)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.tensor([0] + lengths[:-1]).cumsum(0)] = -100
    return dict(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False), \
        torch.ones_like(ids, dtype=torch.bool)


BATCHES = {"plain": plain_batch, "padded": padded_batch, "packed": packed_batch}


def _assert_grads_match(stock, lit, tol=1e-4, unused=()):
    """Every gradient within ``tol`` relative; parameters under the ``unused`` prefixes may have none (on both)."""
    checked = 0
    for (name, pa), (name_b, pb) in zip(stock.named_parameters(), lit.named_parameters()):
        assert name == name_b
        if not pa.requires_grad:
            continue
        if pa.grad is None and name.startswith(unused):
            assert pb.grad is None, name
            continue
        assert pa.grad is not None and pb.grad is not None, name
        if pa.grad.norm() < 1e-6:  # analytically zero (a key bias: softmax is shift-invariant): noise on both sides
            assert (pb.grad - pa.grad).norm() < 1e-6, name
        else:
            assert rel_err(pb.grad, pa.grad) <= tol, name
        checked += 1
    assert checked > 0


def _expected_counts(model, family):
    resolved = ARCHITECTURES[family].resolve()
    expected = {}
    for m in model.modules():
        kind = resolved.get(type(m))
        if kind is not None:
            expected[kind] = expected.get(kind, 0) + 1
    return expected


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def test_table_rows_resolve():
    config_fields = {f.name for f in dataclasses.fields(LitesparkConfig)}
    for model_type in ("gemma2", "gemma3_text", "gemma3"):
        arch = ARCHITECTURES[model_type]
        resolved = arch.resolve()
        assert len(resolved) == len(arch.swaps)  # every class exists in this transformers version
        for cls, kind in resolved.items():
            assert isinstance(cls, type) and issubclass(cls, torch.nn.Module)
            switch, mixin = SWAP_KINDS[kind]
            # a mixin changes the forward, or (Gemma3's text model) tells the unpadding to keep a batch padded
            assert switch in config_fields and (hasattr(mixin, "forward") or hasattr(mixin, "litespark_keeps_padding"))
    assert {"gemma2", "gemma3_text", "gemma3"} <= set(litespark_hf.SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("family", FAMILIES)
def test_apply_swaps_every_listed_module_once_restores_and_shares_weights(family):
    model = gemma_model(family)
    before = dict(model.named_parameters())
    stock_impl = model.config._attn_implementation
    expected = _expected_counts(model, family)
    layers = TEXT["num_hidden_layers"]
    norms = 4 * layers + 1 + (2 * layers if family == "gemma3_text" else 0)  # + Gemma3's q/k norms
    attention = "gemma2_attention" if family == "gemma2" else "attention_layer_window"
    assert expected == {"gemma_rms_norm": norms, "gemma_decoder_layer": layers, "gated_mlp": layers,
                        attention: layers, "scaled_embedding": 1, "causal_lm": 1,
                        **({"gemma3_text_model": 1} if family == "gemma3_text" else {})}
    litespark_hf.apply(model)
    assert litespark_hf.swapped_counts(model) == expected
    assert model.config._attn_implementation == "litespark"
    assert type(model.lm_head).__name__ == "LitesparkLinear"
    assert type(model.model.embed_tokens).__name__.startswith("Litespark")
    assert all(p is before[n] for n, p in model.named_parameters())  # nothing copied
    keys = set(model.state_dict())
    ids = _ids(2, 20, 0)
    model.eval()
    with torch.no_grad():
        first = model(input_ids=ids).logits
        litespark_hf.apply(model)  # twice: no change
        assert litespark_hf.swapped_counts(model) == expected
        assert torch.equal(model(input_ids=ids).logits, first)
    assert set(model.state_dict()) == keys
    litespark_hf.restore(model)
    assert model.config._attn_implementation == stock_impl
    assert all(original_class(m) is None for m in model.modules())


# ---------------------------------------------------------------------------------------------------------------
# Equivalence with stock
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_kind", list(BATCHES))
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_stock(family, batch_kind):
    stock, lit = make_pair(family)
    inputs, valid = BATCHES[batch_kind]()
    stock.eval(), lit.eval()
    no_labels = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
    with torch.no_grad():
        a, b = stock(**no_labels).logits, lit(**no_labels).logits
    assert rel_err(b[valid], a[valid]) <= 1e-4
    stock.train(), lit.train()
    loss_a, loss_b = stock(**inputs).loss, lit(**inputs).loss
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    loss_a.backward()
    loss_b.backward()
    _assert_grads_match(stock, lit)


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_training_steps_match_stock(family):
    stock, lit = make_pair(family)
    history = train_side_by_side((stock, lit), alternating_padded_batches(padded_batch()[0]["attention_mask"],
                                                                          padded_labels, low=1, high=VOCAB))
    for step, (a, b) in enumerate(history):
        assert abs(a - b) <= 1e-3, f"step {step}: {a} vs {b}"
    assert history[-1][0] < history[0][0]  # the model did train


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_matches_stock(family):
    """Under gradient checkpointing the MLP's add is not handed to the next layer's norm (the recomputation must
    save what the first pass saved): same loss and gradients."""
    stock, lit = make_pair(family)
    for m in (stock, lit):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    inputs, _ = padded_batch()
    la, lb = stock(**inputs).loss, lit(**inputs).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
    la.backward()
    lb.backward()
    _assert_grads_match(stock, lit)


def test_gemma3_bidirectional_attention_matches_stock():
    """``use_bidirectional_attention`` (EmbeddingGemma-style): not causal, with a windowed overlay on the sliding
    layers; transformers' own mask reaches the backend."""
    stock, lit = make_pair("gemma3_text", use_bidirectional_attention=True)
    inputs, valid = padded_batch()
    stock.eval(), lit.eval()
    kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    with torch.no_grad():
        assert rel_err(lit(**kw).logits[valid], stock(**kw).logits[valid]) <= 1e-4


# ---------------------------------------------------------------------------------------------------------------
# The quirks, one by one
# ---------------------------------------------------------------------------------------------------------------


class _AttentionSpy:
    """Records the keyword arguments every call of the ``litespark`` attention function gets."""

    def __init__(self, monkeypatch):
        self.calls = []

        def spy(module, query, key, value, attention_mask, **kwargs):
            self.calls.append((module.layer_idx, kwargs))
            return litespark_attention_forward(module, query, key, value, attention_mask, **kwargs)

        monkeypatch.setitem(AttentionInterface._global_mapping, "litespark", spy)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_gets_scaling_window_and_softcap_as_stock_passes_them(family, monkeypatch):
    """Gemma2 passes softcap=attn_logit_softcapping; Gemma3 keeps attn_logit_softcapping on the module but never
    passes it (set here: Litespark must ignore it too, and match stock). Scaling is query_pre_attn_scalar ** -0.5,
    the window the layer's own."""
    overrides = {} if family == "gemma2" else dict(attn_logit_softcapping=5.0)
    stock, lit = make_pair(family, **overrides)
    spy = _AttentionSpy(monkeypatch)
    ids = _ids(2, 20, 0)
    stock.eval(), lit.eval()
    with torch.no_grad():
        a, b = stock(input_ids=ids, use_cache=False).logits, lit(input_ids=ids, use_cache=False).logits
    assert rel_err(b, a) <= 1e-4
    assert [i for i, _ in spy.calls] == [0, 1, 2]
    for layer, kwargs in spy.calls:
        assert kwargs["scaling"] == 24 ** -0.5
        assert kwargs.get("sliding_window") == (6 if LAYER_TYPES[layer] == "sliding_attention" else None)
        assert kwargs.get("softcap") == (5.0 if family == "gemma2" else None)


def test_softcap_under_eager_runs_the_stock_attention():
    """attention=False keeps the eager implementation; LitesparkAttention's eager fallback (Llama's) has no
    soft-cap, so Gemma2's attention then runs its stock forward."""
    stock = gemma_model("gemma2")
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit, attention=False)
    assert lit.config._attn_implementation == "eager"
    assert litespark_hf.swapped_counts(lit)["gemma2_attention"] == 3
    inputs, valid = padded_batch()
    stock.train(), lit.train()
    la, lb = stock(**inputs).loss, lit(**inputs).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
    la.backward()
    lb.backward()
    _assert_grads_match(stock, lit)


class _LossSpy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = litespark_kernels.fused_linear_cross_entropy

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(litespark_kernels, "fused_linear_cross_entropy", spy)


@pytest.mark.parametrize("family,cap", [("gemma2", 3.0), ("gemma3_text", 3.0), ("gemma3_text", None)])
def test_final_logit_softcap_runs_in_the_fused_loss(family, cap, monkeypatch):
    """With or without a final-logit soft-cap the loss is the fused linear cross-entropy (the cap inside it, no
    warning about it), equal to stock's (more in tests/test_fused_ce_softcap.py)."""
    from litespark_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "_WARNED", set())
    stock, lit = make_pair(family, final_logit_softcapping=cap)
    spy = _LossSpy(monkeypatch)
    inputs, _ = padded_batch()
    stock.train(), lit.train()
    la = stock(**inputs).loss
    with pytest.warns(UserWarning) as record:
        lb = lit(**inputs).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
    warned = any("final_logit_softcapping" in str(w.message) for w in record)
    assert not warned
    assert spy.calls == 1
    la.backward()
    lb.backward()
    _assert_grads_match(stock, lit)


def test_norm_links_follow_the_sandwich_structure():
    """The post-attention norm feeds the residual add, not the MLP: only the input and pre-feedforward norms may
    write the autocast dtype for their (casting) consumers."""
    _, lit = make_pair("gemma3_text")
    for layer in lit.model.layers:
        assert layer.input_layernorm.__dict__["_litespark_consumer"]() is layer.self_attn
        assert layer.pre_feedforward_layernorm.__dict__["_litespark_consumer"]() is layer.mlp
        assert "_litespark_consumer" not in layer.post_attention_layernorm.__dict__
        assert "_litespark_consumer" not in layer.post_feedforward_layernorm.__dict__


@pytest.mark.parametrize("family", FAMILIES)
def test_both_residual_adds_are_fused(family, monkeypatch):
    calls = []
    real = litespark_kernels.add_rms_norm

    def spy(*args, **kwargs):
        calls.append(kwargs.get("offset"))
        return real(*args, **kwargs)

    monkeypatch.setattr(litespark_kernels, "add_rms_norm", spy)
    _, lit = make_pair(family)
    lit.train()
    ids = _ids(2, 20, 0)
    lit(input_ids=ids, labels=ids).loss.backward()
    assert calls == [1.0] * (2 * TEXT["num_hidden_layers"])  # pre-feedforward + the next norm, per layer


def test_autocast_bf16_close_to_stock():
    """CPU autocast (bf16): the norms that feed casting projections write bf16, the rest keep stock's dtypes."""
    stock, lit = make_pair("gemma3_text")
    inputs, valid = padded_batch()
    stock.train(), lit.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        la, lb = stock(**inputs).loss, lit(**inputs).loss
    assert abs(la.item() - lb.item()) <= 2e-2 * la.item()


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_all_linear_matches_peft(family):
    from peft import LoraConfig, get_peft_model

    from litespark_hf.modules import lora_group

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    stock = get_peft_model(gemma_model(family), config)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    layer = lit.base_model.model.model.layers[0]
    assert lora_group((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)) is not None
    assert lora_group((layer.mlp.gate_proj, layer.mlp.up_proj)) is not None  # the fused LoRA path is taken
    inputs, valid = padded_batch()
    stock.eval(), lit.eval()
    kw = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
    with torch.no_grad():
        assert rel_err(lit(**kw).logits[valid], stock(**kw).logits[valid]) <= 1e-4
    stock.train(), lit.train()
    la, lb = stock(**inputs).loss, lit(**inputs).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
    la.backward()
    lb.backward()
    lora = 0
    for (name, pa), pb in zip(stock.named_parameters(), lit.parameters()):
        if pa.requires_grad:
            assert "lora_" in name and rel_err(pb.grad, pa.grad) <= 1e-4, name
            lora += 1
        else:
            assert pb.grad is None, name
    assert lora > 0


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels in the CPU interpreter
# ---------------------------------------------------------------------------------------------------------------


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_reference_is_transformers_gemma_rms_norm(dtype):
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    torch.manual_seed(0)
    x = torch.randn(4, 7, 64).to(dtype)
    for cls in (Gemma2RMSNorm, Gemma3RMSNorm):
        norm = cls(64, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.normal_(0, 0.3)
        xa, xb = _leaf(x), _leaf(x)
        wb = _leaf(norm.weight)
        ya, yb = norm(xa), rms_norm_reference(xb, wb, 1e-6, offset=1.0)
        assert ya.dtype == yb.dtype == dtype and torch.equal(ya, yb)
        g = torch.randn_like(ya)
        ga = torch.autograd.grad(ya, (xa, norm.weight), g)
        gb = torch.autograd.grad(yb, (xb, wb), g)
        assert all(torch.equal(p, q) for p, q in zip(ga, gb))


@pytest.fixture
def looped(monkeypatch):
    monkeypatch.setattr(rms_mod, "MAX_FUSED_BLOCK", 32)
    monkeypatch.setattr(rms_mod, "LOOP_BLOCK", 32)


def _check(ours, ref, oracle, dtype):
    """ours no farther from the float64 oracle than twice the same-dtype reference, plus slack (test_norm_kernels)."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    slack = 1e-6 if dtype == torch.float32 else 1e-3
    e, e_ref = rel_err(ours.double(), oracle.double()), rel_err(ref.double(), oracle.double())
    assert e <= 2 * e_ref + slack, (e, e_ref)


def _offset_cases(dtype):
    torch.manual_seed(1)
    x = torch.randn(3, 7, 123, dtype=dtype)
    r = torch.randn(3, 7, 123, dtype=dtype)
    w = (0.3 * torch.randn(123)).to(dtype)
    return x, r, w


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("path", ["registers", "looped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_offset_kernels_match_the_reference(dtype, path, request):
    if path == "looped":
        request.getfixturevalue("looped")
    x, r, w = _offset_cases(dtype)
    # plain
    ins = [(_leaf(x), _leaf(w)), (_leaf(x), _leaf(w)), (_leaf(x.double()), _leaf(w.double()))]
    ys = [rms_mod.rms_norm_triton(*ins[0], 1e-6, offset=1.0), rms_norm_reference(*ins[1], 1e-6, 1.0),
          rms_norm_reference(*ins[2], 1e-6, 1.0)]
    assert ys[0].dtype == dtype
    _check(*ys, dtype)
    g = torch.randn_like(ys[1])
    grads = [torch.autograd.grad(y, i, gg) for y, i, gg in zip(ys, ins, (g, g, g.double()))]
    for ours, ref, orc in zip(*grads):
        _check(ours, ref, orc, dtype)
    # fused residual add
    ins = [tuple(_leaf(t) for t in (x, r, w)) for _ in range(2)] + [tuple(_leaf(t.double()) for t in (x, r, w))]
    outs = [rms_mod.add_rms_norm_triton(*ins[0], 1e-6, offset=1.0), add_rms_norm_reference(*ins[1], 1e-6, 1.0),
            add_rms_norm_reference(*ins[2], 1e-6, 1.0)]
    assert torch.equal(outs[0][1], outs[1][1])  # the sum: one rounding, as stock
    _check(outs[0][0], outs[1][0], outs[2][0], dtype)
    gy, gs = torch.randn_like(outs[1][0]), torch.randn_like(outs[1][1])
    grads = [torch.autograd.grad(o, i, (a, b)) for o, i, (a, b) in
             zip(outs, ins, ((gy, gs), (gy, gs), (gy.double(), gs.double())))]
    for ours, ref, orc in zip(*grads):
        _check(ours, ref, orc, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
def test_offset_kernel_mixed_dtypes_as_in_a_gemma_layer():
    """bf16 branch (a post-norm's output under autocast) + fp32 residual stream, fp32 weight, bf16 output for the
    MLP: the sum is stock's ``residual + x``, the output the fp32 reference rounded once, the gradients in each
    input's dtype."""
    torch.manual_seed(4)
    x = _leaf(torch.randn(2, 5, 123).to(torch.bfloat16))
    r, w = _leaf(torch.randn(2, 5, 123)), _leaf(0.3 * torch.randn(123))
    y, s = rms_mod.add_rms_norm_triton(x, r, w, 1e-6, torch.bfloat16, offset=1.0)
    xr, rr, wr = (_leaf(t.detach()) for t in (x, r, w))
    yr, sr = add_rms_norm_reference(xr, rr, wr, 1e-6, 1.0)
    assert s.dtype == torch.float32 and torch.equal(s, r + x) and y.dtype == torch.bfloat16
    assert torch.equal(y, yr.to(torch.bfloat16)) or rel_err(y, yr) < 1e-2
    gy, gs = torch.randn_like(yr).to(torch.bfloat16), torch.randn_like(s)
    dx, dr, dw = torch.autograd.grad((y, s), (x, r, w), (gy, gs))
    dxr, drr, dwr = torch.autograd.grad((yr, sr), (xr, rr, wr), (gy.float(), gs))
    assert (dx.dtype, dr.dtype, dw.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert rel_err(dr, drr) < 1e-5 and rel_err(dw, dwr) < 1e-5 and rel_err(dx, dxr) < 1e-2
    # plain norm of a bf16 input (Gemma3's q/k norms under autocast): bf16 out, as type_as(x)
    q = _leaf(torch.randn(2, 5, 4, 16).to(torch.bfloat16))
    wq = _leaf(0.3 * torch.randn(16))
    yq = rms_mod.rms_norm_triton(q, wq, 1e-6, offset=1.0)
    assert yq.dtype == torch.bfloat16
    assert rel_err(yq, rms_norm_reference(q.detach(), wq.detach(), 1e-6, 1.0)) < 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_with_triton_kernels_matches_stock(family, monkeypatch):
    """Every kernel on (norm with offset, fused adds, RoPE, GeGLU, attention where no soft-cap, the fused loss and
    the tied scaled embedding's in-place gradient for Gemma3) in Triton's interpreter; head dim 64 for the attention
    kernel."""
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    size = dict(hidden_size=128, intermediate_size=160, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                query_pre_attn_scalar=48, num_hidden_layers=2, layer_types=LAYER_TYPES[:2])
    stock, lit = make_pair(family, **size)
    ids = _ids(2, 24, 0)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    labels = padded_labels(ids, mask)
    valid = mask.bool()
    stock.eval(), lit.eval()
    with torch.no_grad():
        assert rel_err(lit(input_ids=ids, attention_mask=mask).logits[valid],
                       stock(input_ids=ids, attention_mask=mask).logits[valid]) <= 1e-4
    stock.train(), lit.train()
    la = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    lb = lit(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
    la.backward()
    with OpLog() as ops:
        lb.backward()
    if family == "gemma3_text":  # fused loss: the tied lookup's rows go into its weight gradient
        assert "embedding_dense_backward" not in ops.seen and "index_put_" in ops.seen
    _assert_grads_match(stock, lit)


# ---------------------------------------------------------------------------------------------------------------
# The multimodal Gemma3: its text tower
# ---------------------------------------------------------------------------------------------------------------

IMAGE_TOKEN = 120


def _gemma3_multimodal():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**TEXT, "num_hidden_layers": 2, "layer_types": LAYER_TYPES[:2]}
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                  num_attention_heads=2, image_size=16, patch_size=4)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_id=IMAGE_TOKEN,
                          boi_token_index=121, eoi_token_index=122)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).float()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)  # zero init: images matter
    return _spread_norm_weights(model)


def _image_batch(padded):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 110, (2, 20), generator=g)
    types = torch.zeros_like(ids)
    for row, start in ((0, 3), (1, 8)):  # one image of 4 tokens per row
        ids[row, start:start + 4] = IMAGE_TOKEN
        types[row, start:start + 4] = 1
    mask = torch.ones_like(ids)
    if padded:
        mask[0, -4:] = 0
        mask[1, :2] = 0
    labels = padded_labels(ids, mask).masked_fill(types == 1, -100)
    pixels = torch.randn(2, 3, 16, 16, generator=g)
    inputs = dict(input_ids=ids, pixel_values=pixels, token_type_ids=types, labels=labels)
    if padded:
        inputs["attention_mask"] = mask
    return inputs, mask.bool()


def _text_batch():
    inputs, valid = padded_batch()
    return {k: v[:, :20] for k, v in inputs.items()}, valid[:, :20]


def test_gemma3_multimodal_swaps_the_text_tower():
    model = _gemma3_multimodal()
    expected = _expected_counts(model, "gemma3")
    assert expected == {"gemma_rms_norm": 2 * 4 + 1 + 2 * 2 + 1,  # + q/k norms, + the projector's soft-emb norm
                        "gemma_decoder_layer": 2, "gated_mlp": 2, "attention_layer_window": 2,
                        "scaled_embedding": 1, "gemma3_multimodal_model": 1, "causal_lm": 1}
    litespark_hf.apply(model)
    assert litespark_hf.swapped_counts(model) == expected
    assert model.config.get_text_config()._attn_implementation == "litespark"
    vision = model.model.vision_tower
    assert all(original_class(m) is None for m in vision.modules())  # the vision tower keeps its modules


@pytest.mark.parametrize("batch_kind", ["text", "image", "image_padded"])
def test_gemma3_multimodal_matches_stock(batch_kind):
    """Text rows (fused loss, unpadded), and rows with an image each: image tokens attend to their whole image
    (transformers' block mask, which `LitesparkGemma3Model` hands to the backend), padded (the batch stays padded)
    or not."""
    stock = _gemma3_multimodal()
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    if batch_kind == "text":
        inputs, valid = _text_batch()
    else:
        inputs, valid = _image_batch(padded=batch_kind == "image_padded")
    no_labels = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
    stock.eval(), lit.eval()
    with torch.no_grad():
        assert rel_err(lit(**no_labels).logits[valid], stock(**no_labels).logits[valid]) <= 1e-4
    stock.train(), lit.train()
    la, lb = stock(**inputs).loss, lit(**inputs).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
    la.backward()
    lb.backward()
    # text rows use neither tower part; Gemma3 never uses SigLIP's pooling head (it reads the last hidden state)
    unused = ("model.vision_tower.", "model.multi_modal_projector.") if batch_kind == "text" \
        else ("model.vision_tower.head.",)
    _assert_grads_match(stock, lit, unused=unused)


def test_gemma3_multimodal_forward_keeps_the_stock_signature():
    """generate's argument check and the Trainer's unused-column removal read ``inspect.signature(model.forward)``:
    the swapped wrapper shows the stock parameters (pixel_values, token_type_ids, ...), and positional arguments
    bind in the stock order."""
    import inspect

    stock = _gemma3_multimodal()
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    assert inspect.signature(lit.forward) == inspect.signature(stock.forward)
    inputs, _ = _image_batch(padded=True)
    stock.train(), lit.train()
    positional = (inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"])
    rest = dict(token_type_ids=inputs["token_type_ids"], labels=inputs["labels"])
    la, lb = stock(*positional, **rest).loss, lit(*positional, **rest).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()


@pytest.mark.parametrize("family", [*FAMILIES, "gemma3"])
def test_greedy_generation_matches_stock(family):
    """With a KV cache (sliding-window layers keep their window): transformers' 4D masks through the backend."""
    if family == "gemma3":
        stock = _gemma3_multimodal()
        lit = copy.deepcopy(stock)
        litespark_hf.apply(lit)
        inputs, _ = _image_batch(padded=False)
        inputs.pop("labels")
    else:
        stock, lit = make_pair(family)
        ids = _ids(2, 10, 0)
        mask = torch.ones_like(ids)
        mask[1, :2] = 0  # left padding
        inputs = dict(input_ids=ids, attention_mask=mask)
    stock.eval(), lit.eval()
    a = stock.generate(**inputs, max_new_tokens=10, do_sample=False)
    b = lit.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)
