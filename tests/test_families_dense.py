"""The dense families of issue #16 (Phi-3, SmolLM3, OLMo-2, OLMo-3, Granite, Ministral) vs stock transformers (sdpa),
float32 on CPU, each tiny config with its quirks on (tests/tiny_models.py, DENSE_FAMILY_CONFIGS):

- phi3: partial_rotary_factor 0.5, sliding window 8 (< the sequences), fused qkv_proj / gate_up_proj;
- smollm3: layer 1 without RoPE, sliding layers 1-2 (window 8);
- olmo2 / olmo3: post-norms, q/k norms over the whole projection; olmo3 sliding layers 0 and 2 (window 8);
- granite: embedding 2.5, residual 0.4, attention 0.1 multipliers, logits divided by 3;
- ministral: sliding / full layers (window 8).

Criteria (as tests/test_equivalence.py): logits and every parameter gradient within relative error 1e-4 (plain,
right/left padded and packed position_ids batches), 20 AdamW steps with losses within 1e-3; plus PEFT LoRA
(all-linear), the swap counts, the per-layer window / RoPE pattern, and the fallbacks.
"""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import litespark_hf
import litespark_kernels
from litespark_hf.modules import LitesparkOlmoRMSNorm, original_class, swapped_class
from litespark_kernels import _dispatch
from test_equivalence import BATCHES, padded_batch, padded_labels, rel_err
from tiny_models import DENSE_FAMILIES, alternating_padded_batches, assert_grads_match, random_batch, tiny_model, train_side_by_side

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXPECTED_SWAPS = {
    "phi3": {"rms_norm": 5, "decoder_layer_dropout": 2, "packed_gated_mlp": 2, "attention_packed_qkv": 2,
             "causal_lm": 1},
    "smollm3": {"rms_norm": 7, "decoder_layer": 3, "gated_mlp": 3, "attention_no_rope_layers": 3, "causal_lm": 1},
    # per layer: post-attention, post-feedforward, q and k norms; + the final norm. The decoder layers stay stock.
    "olmo2": {"olmo_rms_norm": 9, "gated_mlp": 2, "attention_projection_norm": 2, "causal_lm": 1},
    "olmo3": {"olmo_rms_norm": 13, "gated_mlp": 3, "attention_projection_norm": 3, "causal_lm": 1},
    "granite": {"rms_norm": 5, "decoder_layer_scaled": 2, "gated_mlp": 2, "attention": 2,
                "causal_lm_scaled_logits": 1},
    "ministral": {"rms_norm": 5, "decoder_layer": 2, "gated_mlp": 2, "attention_layer_window": 2, "causal_lm": 1},
}
# the window each layer's attention passes to the kernel (None: full attention)
WINDOWS = {"phi3": [8, 8], "smollm3": [None, 8, 8], "olmo2": [None, None], "olmo3": [8, None, 8],
           "granite": [None, None], "ministral": [8, None]}


def make_pair(family, **overrides):
    stock = tiny_model(family, attn_implementation="sdpa", **overrides)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return stock, lit




class _Spy:
    """Records the calls of a `litespark_kernels` function (its arguments), passing them through."""

    def __init__(self, monkeypatch, name, module=litespark_kernels):
        self.calls = []
        real = getattr(module, name)

        def spy(*args, **kwargs):
            self.calls.append((args, kwargs))
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)


# ------------------------------------------------------------------------------------------------ the swaps
@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_swapped_counts(family):
    model = tiny_model(family)
    before = {name: p for name, p in model.named_parameters()}
    litespark_hf.apply(model)
    assert litespark_hf.swapped_counts(model) == EXPECTED_SWAPS[family]
    assert model.config._attn_implementation == "litespark"
    assert all(p is before[name] for name, p in model.named_parameters())  # nothing copied
    for layer in model.model.layers:
        assert type(layer).__name__ == type(layer).__name__.removeprefix("Litespark")  # stock name (FSDP policies)
        if family.startswith("olmo"):  # post-norm: not swapped, so no residual add is fused
            assert original_class(layer) is None and "_litespark_next" not in layer.__dict__
        else:  # pre-norm: the MLP's residual add is handed to the next norm
            assert layer.__dict__["_litespark_next"][0] is not None
    litespark_hf.apply(model)  # idempotent
    assert litespark_hf.swapped_counts(model) == EXPECTED_SWAPS[family]
    litespark_hf.restore(model)
    assert all(original_class(m) is None for m in model.modules())


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_window_rope_and_scaling_per_layer(family, monkeypatch):
    """Each layer's attention passes the window stock uses; the RoPE kernel runs exactly on the layers stock rotates
    (SmolLM3: not on its no-RoPE layer) and on the rotary channels only (Phi-3: 8 of 16); Granite's
    attention_multiplier is the softmax scale."""
    _, lit = make_pair(family)
    lit.eval()
    attn = _Spy(monkeypatch, "attention")
    rope = _Spy(monkeypatch, "apply_rope")
    with torch.no_grad():
        lit(input_ids=random_batch(batch=2, seq=24), use_cache=False)
    assert [kw.get("sliding_window") for _, kw in attn.calls] == WINDOWS[family]
    n_layers = lit.config.num_hidden_layers
    rotated = [i for i in range(n_layers) if getattr(lit.model.layers[i].self_attn, "use_rope", True)]
    assert len(rope.calls) == len(rotated) == (2 if family == "smollm3" else n_layers)
    head_dim = lit.model.layers[0].self_attn.head_dim
    assert {args[0].shape[-1] for args, _ in rope.calls} == {head_dim // 2 if family == "phi3" else head_dim}
    if family == "granite":
        assert {kw["scale"] for _, kw in attn.calls} == {0.1}


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("batch_kind", list(BATCHES))
@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_logits_and_gradients_match_stock(family, batch_kind):
    stock, lit = make_pair(family)
    inputs, valid = BATCHES[batch_kind]()
    no_labels = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
    stock.eval(), lit.eval()
    with torch.no_grad():
        a = stock(**no_labels).logits
        b = lit(**no_labels).logits
    assert rel_err(b[valid], a[valid]) <= 1e-4

    stock.train(), lit.train()
    out_a, out_b = stock(**inputs), lit(**inputs)
    assert out_b.logits is None  # the fused linear cross-entropy ran (no logits)
    assert abs(out_a.loss.item() - out_b.loss.item()) <= 1e-5 * abs(out_a.loss.item())
    out_a.loss.backward()
    out_b.loss.backward()
    assert_grads_match(stock, lit)


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_twenty_training_steps_match_stock(family):
    stock, lit = make_pair(family)
    history = train_side_by_side((stock, lit), alternating_padded_batches(padded_batch()[0]["attention_mask"],
                                                                          padded_labels))
    for step, (a, b) in enumerate(history):
        assert abs(a - b) <= 1e-3, f"step {step}: {a} vs {b}"
    assert history[-1][0] < history[0][0]  # the model did train


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_lora_all_linear_matches_peft(family, monkeypatch):
    """PEFT LoRA on every projection: the base projections of a group run as one GEMM (Phi-3: qkv_proj and
    gate_up_proj are each a group of one), values and LoRA gradients as PEFT's."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    stock = get_peft_model(tiny_model(family, attn_implementation="sdpa"), config)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    inputs, valid = padded_batch()
    stock.eval(), lit.eval()
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        assert rel_err(lit(**no_labels, use_cache=False).logits[valid],
                       stock(**no_labels, use_cache=False).logits[valid]) <= 1e-4
    from litespark_hf.modules import lora as lora_module

    spy = _Spy(monkeypatch, "fused_linear")
    one_node = _Spy(monkeypatch, "lora_linear", module=lora_module)  # a group and its adapters as one node
    stock.train(), lit.train()
    loss_a, loss_b = stock(**inputs).loss, lit(**inputs).loss
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    loss_a.backward()
    loss_b.backward()
    assert_grads_match(stock, lit)
    base_gemms = {tuple(id(w) for w in args[1]) for args, _ in spy.calls + one_node.calls}
    for layer in lit.base_model.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = (attn.qkv_proj,) if family == "phi3" else (attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = (mlp.gate_up_proj,) if family == "phi3" else (mlp.gate_proj, mlp.up_proj)
        for group in (qkv, gate_up, (attn.o_proj,), (mlp.down_proj,)):
            assert all(hasattr(m, "lora_A") for m in group)
            assert tuple(id(m.base_layer.weight) for m in group) in base_gemms


# ------------------------------------------------------------------------------------------------ family specifics
def test_phi3_residual_dropout_draws_as_stock():
    """Phi-3's resid_pdrop inside the fused decoder layer: the same dropout modules called in stock's order, so the
    same seed gives the same masks, loss and gradients."""
    stock, lit = make_pair("phi3", resid_pdrop=0.2)
    stock.train(), lit.train()
    ids = random_batch(batch=2, seq=24)
    losses = []
    for model in (stock, lit):
        torch.manual_seed(7)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) <= 1e-5 * abs(losses[0])
    assert_grads_match(stock, lit)
    torch.manual_seed(8)
    assert abs(stock(input_ids=ids, labels=ids).loss.item() - losses[0]) > 1e-4  # the dropout is live


def test_phi3_mlp_gate_is_the_first_half():
    """Phi3MLP: ``gate, up = gate_up_proj(x).chunk(2)``; the packed kernel takes the same halves (not swapped)."""
    stock, lit = make_pair("phi3")
    x = torch.randn(2, 5, 64, requires_grad=True)
    mlp_a, mlp_b = stock.model.layers[0].mlp, lit.model.layers[0].mlp
    assert type(mlp_b).__name__ == "LitesparkPhi3MLP"
    a, b = mlp_a(x), mlp_b(x)
    assert rel_err(b, a) <= 1e-6
    half = mlp_a.gate_up_proj.out_features // 2
    gate, up = mlp_a.gate_up_proj(x).split(half, -1)
    swapped = mlp_a.down_proj(torch.nn.functional.silu(up) * gate)
    assert rel_err(swapped, a) > 1e-2  # the order matters for these weights


def test_phi3_activation_without_kernel_falls_back_with_a_warning():
    stock, lit = make_pair("phi3", hidden_act="gelu")  # exact GELU: no fused kernel
    _dispatch._WARNED.discard(("gated_mlp", "activation GELUActivation has no fused kernel"))
    ids = random_batch(batch=2, seq=24)
    stock.eval(), lit.eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="GELUActivation has no fused kernel"):
        b = lit(input_ids=ids, use_cache=False).logits
    with torch.no_grad():
        assert rel_err(b, stock(input_ids=ids, use_cache=False).logits) <= 1e-6


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_olmo_rms_norm_rounds_like_stock_in_bf16(weight_dtype):
    """OLMo's RMSNorm applies the weight before rounding to the input dtype (Llama's norm rounds first): a bf16
    input gives bit-identical outputs, and the same gradients."""
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    stock = Olmo2RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        stock.weight.copy_(torch.randn(64) * 0.5 + 1)
    stock = stock.to(weight_dtype)
    lit = copy.deepcopy(stock)
    lit.__class__ = swapped_class(LitesparkOlmoRMSNorm, Olmo2RMSNorm)
    x = (torch.randn(3, 7, 64) * 3).to(torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = stock(xa), lit(xb)
    assert a.dtype == b.dtype == torch.bfloat16
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert rel_err(lit.weight.grad, stock.weight.grad) <= 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_granite_fused_loss_reads_scaled_hidden_states(tied):
    """Granite: the fused loss of hidden / logits_scaling equals stock's loss of logits / logits_scaling (tied
    embedding included), with the multipliers on; without labels (or in eval) the stock forward returns the
    scaled logits."""
    stock, lit = make_pair("granite", tie_word_embeddings=tied)
    assert (lit.lm_head.weight is lit.model.embed_tokens.weight) == tied
    ids = random_batch(batch=2, seq=24)
    stock.train(), lit.train()
    out_a, out_b = stock(input_ids=ids, labels=ids), lit(input_ids=ids, labels=ids)
    assert out_b.logits is None
    assert abs(out_a.loss.item() - out_b.loss.item()) <= 1e-5 * out_a.loss.item()
    out_a.loss.backward()
    out_b.loss.backward()
    assert_grads_match(stock, lit)
    with torch.no_grad():
        logits = lit(input_ids=ids, use_cache=False).logits  # training mode, no labels: stock forward
        assert rel_err(logits, stock(input_ids=ids, use_cache=False).logits) <= 1e-6


def test_granite_loss_without_a_plain_head_is_stock(monkeypatch):
    """A head with a hook (or sharded, or with bias) is left to the stock forward: logits / logits_scaling."""
    stock, lit = make_pair("granite")
    lit.lm_head.register_forward_hook(lambda *a: None)
    fused = _Spy(monkeypatch, "fused_linear_cross_entropy")
    ids = random_batch(batch=2, seq=24)
    stock.train(), lit.train()
    out_a, out_b = stock(input_ids=ids, labels=ids), lit(input_ids=ids, labels=ids)
    assert out_b.logits is not None and not fused.calls
    assert abs(out_a.loss.item() - out_b.loss.item()) <= 1e-6 * out_a.loss.item()


# ------------------------------------------------------------------------------------------------ Triton kernels
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("family", ["phi3", "smollm3", "olmo3", "granite"])
def test_tiny_model_with_triton_kernels_matches_stock(family, monkeypatch):
    """As tests/test_equivalence_triton_cpu.py: every Triton kernel on, in Triton's CPU interpreter (head dim 64 for
    the attention kernel). Phi-3's RoPE kernel then rotates a strided slice (the rotary half of each head)."""
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    size = dict(hidden_size=128, intermediate_size=160, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                num_hidden_layers=2)
    layers = {"smollm3": dict(no_rope_layers=[1, 0], layer_types=["full_attention", "sliding_attention"]),
              "olmo3": dict(layer_types=["sliding_attention", "full_attention"])}.get(family, {})
    stock, lit = make_pair(family, **size, **layers)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -7:] = 0
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
    lb.backward()
    assert_grads_match(stock, lit)
