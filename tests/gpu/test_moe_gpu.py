"""The MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS) and the grouped-linear op on the GPU in bf16.

Criteria as tests/gpu/test_equivalence_gpu.py: both bf16 models (stock with its default experts implementation,
grouped_mm, and Litespark) against an fp32 oracle (the stock model in float32 on the same weights); Litespark's
relative error <= 2x stock's + 2e-3 for logits and every parameter gradient (router top-k may pick other experts for
a few tokens in bf16, in both models, and such a flip moves a token's whole contribution: gradients
get 3x + 1e-2); 20 AdamW steps within 1e-2 + 5e-2 * loss. The grouped op: torch's grouped
GEMM (bf16) and the dispatcher (bf16 and fp16) against the fp32 reference, forward and backward, with empty groups
and odd sizes; the experts forward and backward without a host sync.
"""

import copy

import pytest
import torch

import litespark_hf
import litespark_kernels as lk
from litespark_hf.modules import litespark_experts_forward
from litespark_kernels.ops import grouped_linear as gl
from tiny_models import MOE_FAMILIES, tiny_model, train_side_by_side

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]

GPU_SIZE = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                sliding_window=64)
MOE_SIZE = {"qwen2_moe": dict(moe_intermediate_size=128, shared_expert_intermediate_size=256),
            "qwen3_moe": dict(moe_intermediate_size=128)}
SEQ = 256


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def models(family):
    attn = "eager" if family == "gpt_oss" else "sdpa"
    oracle = tiny_model(family, attn_implementation=attn, **GPU_SIZE, **MOE_SIZE.get(family, {})).cuda()
    stock = copy.deepcopy(oracle).to(torch.bfloat16)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return oracle, stock, lit


def batch(kind):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if kind == "padded":
        mask[0, -37:] = 0
        mask[1, :21] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return dict(input_ids=ids.cuda(), attention_mask=mask.cuda(), labels=labels.cuda()), mask.bool().cuda()


@pytest.mark.parametrize("kind", ["plain", "padded"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_bf16_logits_and_gradients(family, kind):
    oracle, stock, lit = models(family)
    inputs, valid = batch(kind)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    outs = []
    for m in (oracle, stock, lit):
        m.eval()
        with torch.no_grad():
            outs.append(m(**no_labels, use_cache=False).logits[valid])
    err_stock, err_lit = rel_err(outs[1], outs[0]), rel_err(outs[2], outs[0])
    assert err_lit <= 2 * err_stock + 2e-3, (err_lit, err_stock)

    grads, aux = [], []
    for m in (oracle, stock, lit):
        m.train()
        m.zero_grad()
        out = m(**inputs)
        out.loss.backward()
        aux.append(out.aux_loss.item())
        grads.append([p.grad for p in m.parameters()])
    assert abs(aux[2] - aux[0]) <= 2 * abs(aux[1] - aux[0]) + 1e-2 * aux[0], aux
    for (name, _), g0, g1, g2 in zip(oracle.named_parameters(), *grads):
        e1, e2 = rel_err(g1, g0), rel_err(g2, g0)
        # 3x stock + 1e-2 (dense families: 2x + 2e-3): a token whose bf16 router logits tie-break to another expert
        # moves its whole contribution between experts, and the two bf16 models flip different tokens; the change
        # reaches every gradient upstream of that layer. H200 runs, mixtral plain batch: down_proj 0.087 vs stock
        # 0.041, layer-1 post_attention_layernorm 0.093 vs 0.046; gpt_oss padded: router bias 0.041 vs 0.014.
        assert e2 <= 3 * e1 + 1e-2, (name, e2, e1)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_bf16_twenty_steps(family):
    _, stock, lit = models(family)
    for step, (a, b) in enumerate(train_side_by_side((stock, lit), [batch("padded")[0]], lr=1e-3)):
        assert abs(a - b) <= 1e-2 + 5e-2 * a, (step, a, b)


def _grouped_inputs(dtype, k_in, n_out, counts, transposed, bias=True, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = len(counts)
    offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), k_in, device="cuda", generator=g).to(dtype)
    shape = (groups, k_in, n_out) if transposed else (groups, n_out, k_in)
    w = (torch.randn(shape, device="cuda", generator=g) * k_in ** -0.5).to(dtype)
    b = torch.randn(groups, n_out, device="cuda", generator=g).to(dtype) if bias else None
    return x, w, b, offsets


def _check_against_fp32_reference(fn, dtype, k_in, n_out, counts, transposed, tol):
    x, w, b, offsets = _grouped_inputs(dtype, k_in, n_out, counts, transposed)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    leaves32 = [t.detach().float().requires_grad_() for t in (x, w, b)]
    out = fn(*leaves[:2], offsets, leaves[2], transposed=transposed)
    ref = gl.grouped_linear_reference(*leaves32[:2], offsets, leaves32[2], transposed=transposed)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= tol
    grad = torch.randn(out.shape, device="cuda", dtype=torch.float32)
    got = torch.autograd.grad(out, leaves, grad.to(dtype))
    want = torch.autograd.grad(ref, leaves32, grad)
    for name, a, e in zip(("x", "w", "b"), got, want):
        assert a.dtype == dtype, name
        assert rel_err(a, e) <= tol, (name, rel_err(a, e))
    empty = [i for i, c in enumerate(counts) if c == 0]
    assert all(torch.count_nonzero(got[1][i]) == 0 for i in empty)


@pytest.mark.parametrize("transposed", [False, True])
def test_torch_grouped_gemm_bf16_matches_reference(transposed):
    """The fast path itself (one grouped GEMM) in bf16, 8 groups of which three get no rows."""
    _check_against_fp32_reference(gl.grouped_linear_grouped_mm, torch.bfloat16, 256, 384,
                                  [37, 0, 128, 5, 0, 64, 1, 0], transposed, tol=1e-2)


@pytest.mark.parametrize("size", [(256, 384), (123, 37)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_linear_dispatch_matches_reference(dtype, transposed, size):
    """The dispatcher in bf16 (grouped GEMM; odd sizes: reference) and fp16 (reference), forward and backward."""
    _check_against_fp32_reference(lk.grouped_linear, dtype, *size, [37, 0, 128, 5, 0, 64, 1, 0], transposed,
                                  tol=1e-2)


def test_grouped_linear_under_autocast_casts_like_linear():
    x, w, b, offsets = _grouped_inputs(torch.float32, 256, 128, [10, 0, 30], transposed=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = lk.grouped_linear(x, w, offsets, b)
    assert out.dtype == torch.bfloat16
    ref = gl.grouped_linear_reference(x, w, offsets, b)
    assert rel_err(out, ref) <= 1e-2


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_experts_forward_and_backward_have_no_host_sync(family):
    _, _, lit = models(family)
    experts = lit.model.layers[0].mlp.experts
    hidden = lit.config.hidden_size
    x = torch.randn(512, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scores = torch.rand(512, experts.num_experts, device="cuda")
    scores[:, 1] = -1  # an idle expert
    weights, index = scores.topk(lit.config.num_experts_per_tok, dim=-1)
    weights = torch.softmax(weights, dim=-1).to(torch.bfloat16)
    litespark_experts_forward(experts, x, index, weights).sum().backward()  # warm-up (first launches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = litespark_experts_forward(experts, x, index, weights)
        out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
