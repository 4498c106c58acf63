"""The mixture-of-experts families of issue #16 (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS) vs stock transformers,
float32 on CPU, each tiny config with its quirks on (tests/tiny_models.py, MOE_FAMILY_CONFIGS): 4 experts, top-2,
``output_router_logits`` (the aux loss is in the loss, coefficient 0.1); Qwen2-MoE's shared expert, Qwen2/3-MoE's
``mlp_only_layers=[1]`` (a dense layer between MoE layers), Qwen2-MoE's sliding first layer, Qwen3-MoE's
``norm_topk_prob``, GPT-OSS's sinks, biases, clamped SwiGLU and sliding / full layers (window 8 < the sequences).

Stock runs with ``experts_implementation="eager"`` (the per-expert loop) and with its default ("grouped_mm" where
torch has it). Criteria (as tests/test_equivalence.py): logits and every parameter gradient within relative error
1e-4 (plain, right/left padded and packed batches), loss and aux loss equal, 20 AdamW steps with losses within 1e-3;
plus PEFT LoRA on the attention projections, and the grouped-linear op against its reference.
"""

import copy

import pytest
import torch

import litespark_hf
import litespark_kernels as lk
from litespark_kernels.ops import grouped_linear as gl
from litespark_hf.modules import litespark_experts_forward
from test_equivalence import BATCHES, padded_batch, padded_labels, rel_err
from tiny_models import MOE_FAMILIES, OpLog, alternating_padded_batches, assert_grads_match, tiny_model, train_side_by_side

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

EXPECTED_SWAPS = {
    "mixtral": {"rms_norm": 5, "decoder_layer": 2, "attention_config_window": 2, "moe_experts": 2, "moe_model": 1,
                "moe_causal_lm": 1},
    # 3 layers, layer 1 dense: 2 experts modules; gated MLPs = 2 shared experts + 1 dense MLP
    "qwen2_moe": {"rms_norm": 7, "decoder_layer": 3, "attention_layer_window": 3, "moe_experts": 2, "gated_mlp": 3,
                  "moe_model": 1, "moe_causal_lm": 1},
    "qwen3_moe": {"rms_norm": 13, "decoder_layer": 3, "attention_layer_window": 3, "moe_experts": 2, "gated_mlp": 1,
                  "moe_model": 1, "moe_causal_lm": 1},
    # OLMo-rounded norms, so the decoder layers stay stock (no fused adds)
    "gpt_oss": {"olmo_rms_norm": 5, "attention_sinks": 2, "moe_experts": 2, "moe_model": 1, "moe_causal_lm": 1},
}
STOCK_EXPERTS = ["eager", "default"]


def make_pair(family, experts="eager", **overrides):
    kwargs = {} if experts == "default" else {"experts_implementation": experts}
    # GPT-OSS has no SDPA attention in transformers
    stock = tiny_model(family, attn_implementation="eager" if family == "gpt_oss" else "sdpa", **kwargs, **overrides)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return stock, lit




def _block_masks(lengths, window):
    """GPT-OSS's stock masks do not read position_ids (it attends across packed documents): the per-document
    causal masks, full and sliding, as transformers' additive 4D masks."""
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    pos = torch.arange(seg.numel())
    full = (pos[:, None] >= pos[None, :]) & (seg[:, None] == seg[None, :])
    sliding = full & (pos[:, None] - pos[None, :] < window)
    neg = torch.finfo(torch.float32).min
    return {"full_attention": torch.zeros(full.shape).masked_fill(~full, neg)[None, None],
            "sliding_attention": torch.zeros(full.shape).masked_fill(~sliding, neg)[None, None]}


def stock_forward(stock, family, batch_kind, inputs):
    """(loss, aux_loss, logits) of the stock model; GPT-OSS's packed batch with per-document masks (stock code:
    the model, the head, the loss function and the family's load_balancing_loss_func)."""
    if not (family == "gpt_oss" and batch_kind == "packed"):
        out = stock(**inputs)
        return out.loss, out.aux_loss, out.logits
    import transformers.models.gpt_oss.modeling_gpt_oss as gpt_oss

    out = stock.model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False,
                      attention_mask=_block_masks([7, 10, 9], stock.config.sliding_window),
                      output_router_logits=True)
    logits = stock.lm_head(out.last_hidden_state)
    aux = gpt_oss.load_balancing_loss_func(out.router_logits, stock.num_experts, stock.num_experts_per_tok, None)
    loss = None
    if "labels" in inputs:
        loss = stock.loss_function(logits, inputs["labels"], stock.vocab_size) + stock.router_aux_loss_coef * aux
    return loss, aux, logits


# ------------------------------------------------------------------------------------------------ the swaps
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_swapped_counts_and_restore(family):
    model = tiny_model(family)
    before = {name: p for name, p in model.named_parameters()}
    impl = model.config._experts_implementation
    litespark_hf.apply(model)
    assert litespark_hf.swapped_counts(model) == EXPECTED_SWAPS[family]
    assert all(p is before[name] for name, p in model.named_parameters())  # nothing copied
    assert model.config._experts_implementation == impl  # the swap is per module, the config is untouched
    litespark_hf.apply(model)
    assert litespark_hf.swapped_counts(model) == EXPECTED_SWAPS[family]
    litespark_hf.restore(model)
    assert all(type(m).__module__.startswith("transformers") or type(m).__module__.startswith("torch")
               for m in model.modules())


def test_litespark_experts_implementation_is_registered():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["litespark"] is litespark_experts_forward
    stock = tiny_model("mixtral", attn_implementation="sdpa", experts_implementation="eager")
    lit = tiny_model("mixtral", attn_implementation="sdpa", experts_implementation="litespark")  # no swap at all
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(lit(input_ids=ids).logits, stock(input_ids=ids).logits) <= 1e-5


# ------------------------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("batch_kind", list(BATCHES))
@pytest.mark.parametrize("experts", STOCK_EXPERTS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_gradients_and_aux_loss_match_stock(family, experts, batch_kind):
    stock, lit = make_pair(family, experts)
    inputs, valid = BATCHES[batch_kind]()
    no_labels = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
    stock.eval(), lit.eval()
    with torch.no_grad():
        a = stock_forward(stock, family, batch_kind, no_labels)[2]
        b = lit(**no_labels).logits
    assert rel_err(b[valid], a[valid]) <= 1e-4

    stock.train(), lit.train()
    loss_a, aux_a, _ = stock_forward(stock, family, batch_kind, inputs)
    out_b = lit(**inputs)
    assert out_b.logits is None  # the fused linear cross-entropy ran
    assert out_b.aux_loss is not None and abs(out_b.aux_loss.item() - aux_a.item()) <= 1e-5 * aux_a.item()
    assert abs(loss_a.item() - out_b.loss.item()) <= 1e-5 * abs(loss_a.item())
    loss_a.backward()
    out_b.loss.backward()
    assert_grads_match(stock, lit)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_logits_of_a_padded_batch_come_back_padded(family):
    """The unpadded stack's router logits are scattered back to [batch * seq, experts]; at the real tokens they are
    stock's."""
    stock, lit = make_pair(family)
    inputs, valid = padded_batch()
    stock.train(), lit.train()
    out_a = stock(**inputs)
    out_b = lit(**inputs)
    assert len(out_b.router_logits) == len(out_a.router_logits) == 2
    for ra, rb in zip(out_a.router_logits, out_b.router_logits):
        assert ra.shape == rb.shape
        keep = valid.reshape(-1)
        assert rel_err(rb[keep], ra[keep]) <= 1e-5
        assert torch.count_nonzero(rb[~keep]) == 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_twenty_training_steps_match_stock(family):
    stock, lit = make_pair(family, "default")
    history = train_side_by_side((stock, lit), alternating_padded_batches(padded_batch()[0]["attention_mask"],
                                                                          padded_labels))
    for step, (a, b) in enumerate(history):
        assert abs(a - b) <= 1e-3, f"step {step}: {a} vs {b}"
    assert history[-1][0] < history[0][0]  # the model did train


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_on_the_attention_matches_peft(family):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.0, init_lora_weights=False)
    stock = get_peft_model(make_pair(family)[0], config)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    assert litespark_hf.swapped_counts(lit)["moe_experts"] == 2
    inputs, valid = padded_batch()
    stock.train(), lit.train()
    out_a, out_b = stock(**inputs), lit(**inputs)
    assert abs(out_a.loss.item() - out_b.loss.item()) <= 1e-5 * out_a.loss.item()
    out_a.loss.backward()
    out_b.loss.backward()
    assert_grads_match(stock, lit)


def test_aux_loss_off_gives_the_plain_loss():
    stock, lit = make_pair("qwen2_moe", output_router_logits=False)
    inputs, _ = padded_batch()
    stock.train(), lit.train()
    out_a, out_b = stock(**inputs), lit(**inputs)
    assert out_a.aux_loss is None and out_b.aux_loss is None
    assert abs(out_a.loss.item() - out_b.loss.item()) <= 1e-5 * out_a.loss.item()
    out_b = lit(**inputs, output_router_logits=True)  # the argument wins over the config, as stock
    assert out_b.aux_loss is not None


def test_gpt_oss_sinks_reach_the_backend(monkeypatch):
    """Each GPT-OSS layer's attention gets its sinks (s_aux) and its window (sliding, then full)."""
    import litespark_hf.attention as attention

    _, lit = make_pair("gpt_oss")
    seen = []
    real = attention._reference_attention

    def spy(*args, **kwargs):
        seen.append(kwargs["sinks"])
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "_reference_attention", spy)
    with torch.no_grad():
        lit(input_ids=torch.randint(0, 128, (1, 20)), use_cache=False)
    assert [s is layer.self_attn.sinks for s, layer in zip(seen, lit.model.layers)] == [True, True]


# ------------------------------------------------------------------------------------------------ the experts
def _routing(tokens, experts, k, seed, empty=()):
    """Random top-k routing that never picks the experts in ``empty``."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(tokens, experts, generator=g)
    scores[:, list(empty)] = -1
    weights, index = scores.topk(k, dim=-1)
    return index, torch.softmax(weights, dim=-1)


def test_experts_forward_has_no_host_sync(monkeypatch):
    """The sort, the counts, the offsets, the gathers and the combine read nothing back on the host (the CPU
    reference GEMM loop does: torch's grouped GEMM, which the CUDA path calls, stands in for it here)."""
    monkeypatch.setattr(lk, "grouped_linear", gl.grouped_linear_grouped_mm)
    stock, _ = make_pair("mixtral", hidden_size=64, intermediate_size=96)
    experts = stock.model.layers[0].mlp.experts
    x = torch.randn(30, 64, requires_grad=True)
    index, weights = _routing(30, 4, 2, seed=3, empty=(2,))
    with OpLog() as log:
        out = litespark_experts_forward(experts, x, index, weights)
        out.backward(torch.randn_like(out))
    assert not {"_local_scalar_dense", "nonzero", "item", "bincount"} & log.seen
    ref = experts(x, index, weights)  # stock eager
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_linear_reference_matches_per_row_linear(transposed, bias):
    """Odd sizes (in 123, out 37), 5 groups of which two get no rows (one of them the last), forward and backward:
    the reference equals each row through its own group's weight."""
    g = torch.Generator().manual_seed(0)
    counts = [4, 0, 9, 3, 0]
    groups = torch.repeat_interleave(torch.arange(5), torch.tensor(counts))
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 123, generator=g, requires_grad=True)
    w = torch.randn(5, 123, 37, generator=g) if transposed else torch.randn(5, 37, 123, generator=g)
    w.requires_grad_()
    b = torch.randn(5, 37, generator=g, requires_grad=True) if bias else None
    out = lk.grouped_linear(x, w, offsets, b, transposed=transposed)
    per_row_w = w[groups] if transposed else w[groups].transpose(1, 2)
    ref = torch.bmm(x[:, None], per_row_w)[:, 0] + (b[groups] if bias else 0)
    assert rel_err(out, ref) <= 1e-6
    grad = torch.randn(out.shape, generator=g)
    leaves = [x, w] + ([b] if bias else [])
    got = torch.autograd.grad(out, leaves, grad)
    want = torch.autograd.grad(ref, leaves, grad)
    for a, e in zip(got, want):
        assert rel_err(a, e) <= 1e-6
    assert torch.count_nonzero(got[1][1]) == 0 and torch.count_nonzero(got[1][4]) == 0  # empty groups: no gradient


@pytest.mark.parametrize("transposed", [False, True])
def test_torch_grouped_gemm_path_matches_the_reference(transposed):
    """The layout the CUDA path hands torch's grouped GEMM (weights [G, K, N], int32 offsets on the device, bias per
    row from the row's group), checked on the CPU in fp32 (16-byte rows: 124 in, 40 out), zero-row groups
    included, forward and backward."""
    g = torch.Generator().manual_seed(1)
    counts = [0, 5, 0, 8, 2]
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), 124, generator=g, requires_grad=True)
    w = (torch.randn(5, 124, 40, generator=g) if transposed else torch.randn(5, 40, 124, generator=g)).requires_grad_()
    b = torch.randn(5, 40, generator=g, requires_grad=True)
    out = gl.grouped_linear_grouped_mm(x, w, offsets, b, transposed=transposed)
    ref = gl.grouped_linear_reference(x, w, offsets, b, transposed=transposed)
    assert rel_err(out, ref) <= 1e-6
    grad = torch.randn(out.shape, generator=g)
    for a, e in zip(torch.autograd.grad(out, [x, w, b], grad), torch.autograd.grad(ref, [x, w, b], grad)):
        assert rel_err(a, e) <= 1e-6


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_with_an_idle_expert_match_stock(family):
    """One expert gets no token: its weights get zero gradients, as stock."""
    stock, lit = make_pair(family)
    experts_a = stock.model.layers[0].mlp.experts
    experts_b = lit.model.layers[0].mlp.experts
    hidden = experts_a.gate_up_proj.shape[1 if family == "gpt_oss" else 2]
    x = torch.randn(20, hidden)
    index, weights = _routing(20, 4, 2, seed=5, empty=(1,))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = experts_a(xa, index, weights), experts_b(xb, index, weights)
    assert rel_err(b, a) <= 1e-5
    grad = torch.randn_like(a)
    a.backward(grad)
    b.backward(grad)
    assert rel_err(xb.grad, xa.grad) <= 1e-5
    for (name, pa), pb in zip(experts_a.named_parameters(), experts_b.parameters()):
        assert rel_err(pb.grad, pa.grad) <= 1e-5, name
    assert torch.count_nonzero(experts_b.gate_up_proj.grad[1]) == 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_flops_count_the_active_experts_only(family):
    """6 N per token with N = every parameter, the routed experts scaled by top_k / E (router, shared experts and
    dense layers in full)."""
    from litespark_hf.efficiency import flops as F

    model = tiny_model(family)
    cfg = model.config
    experts, top_k = model.model.layers[0].mlp.experts.num_experts, cfg.num_experts_per_tok
    active = 0
    for name, p in model.named_parameters():
        active += p.numel() * top_k // experts if ".experts." in name else p.numel()
    assert F.num_active_parameters(model) == active < F.num_parameters(model)
    assert F.flops_per_token(cfg, 32, F.num_parameters(model)) == 6 * active + F.attention_flops_coefficient(cfg) * 32
    dense = tiny_model("llama")
    assert F.inactive_expert_parameters(dense.config) == 0
