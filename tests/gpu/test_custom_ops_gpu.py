"""The kernels as torch.library custom ops under torch.compile with Inductor on the GPU, bf16.

A Litespark decoder layer (Llama: RMSNorm, fused residual add + RMSNorm, fused q/k/v and gate/up projections,
RoPE, attention, SwiGLU; Qwen3: per-head q/k norms too; StarCoder2: LayerNorm, biases, GELU-tanh + bias, sliding
window) is compiled with ``fullgraph=True`` (a graph break inside the layer fails) and Inductor; its output and
gradients are compared with the eager Litespark layer's. Then the whole model is compiled as the Trainer's
``torch_compile=True`` does (``torch.compile(model)``) and its loss and gradients compared with the eager model's.

Criterion (bf16 cannot match bit for bit: Inductor adds gradients that eager autograd adds in bf16 in fp32 before
one rounding): with the eager Litespark layer/model in float32 as the oracle,
    relerr(compiled bf16, oracle) <= 2 * relerr(eager bf16, oracle) + 2e-3,    relerr = |a-b|_2 / |b|_2
Sizes: hidden 256, 4 heads of 64 (2 KV heads), sequence 256, batch 2 (the attention kernel takes them).
"""

import pytest
import torch

import litespark_hf
from tiny_models import layer_output_and_grads, rel_err, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]

GPU_SIZE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                sliding_window=64, num_hidden_layers=2)
SEQ = 256
FAMILIES = ["llama", "qwen3", "starcoder2"]
LAYER_OPS = {"litespark.fused_linear_fwd.default", "litespark.rope_fwd.default", "litespark.attention_fwd.default"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _litespark(family, dtype=torch.float32):
    """The tiny model (same seed: same weights) in ``dtype`` on the GPU, Litespark applied, in training mode."""
    model = tiny_model(family, attn_implementation="sdpa", dtype=dtype, **GPU_SIZE).cuda()
    litespark_hf.apply(model)
    return model.train()


def _models(family):
    """(float32 oracle, bf16 Litespark model), both Litespark (the oracle's attention runs SDPA: fp32)."""
    return _litespark(family), _litespark(family, torch.bfloat16)


def _layer_inputs(model, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, SEQ, GPU_SIZE["hidden_size"], generator=g).cuda().to(dtype)
    pos = torch.arange(SEQ, device="cuda")[None]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(hidden, pos)
    return hidden, pos, (cos, sin)


def _run_layer(layer, hidden, pos, emb):
    return layer_output_and_grads(layer, hidden, pos, emb, seed=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_compiled_decoder_layer_bf16(family):
    oracle, lit = _models(family)
    o_layer, layer = oracle.model.layers[-1], lit.model.layers[-1]  # the last layer: the final norm is eager's
    hidden, pos, emb = _layer_inputs(lit, torch.bfloat16)
    o_hidden = hidden.float()
    o_emb = tuple(t.float() for t in emb)
    explained = torch._dynamo.explain(layer)(hidden, attention_mask=None, position_ids=pos, position_embeddings=emb)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    traced = {str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"}
    assert LAYER_OPS <= traced, LAYER_OPS - traced
    torch._dynamo.reset()

    want = _run_layer(o_layer, o_hidden, pos, o_emb)
    eager = _run_layer(layer, hidden, pos, emb)
    for norm in (oracle.model.norm, lit.model.norm):  # eager's fused-add stash for the final norm
        norm.__dict__.pop("_litespark_prenormed", None)
    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    got = _run_layer(compiled, hidden, pos, emb)
    names = ["output", "d_hidden"] + [n for n, _ in layer.named_parameters()]
    for name, g, e, w in zip(names, got, eager, want):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        err_c, err_e = rel_err(g, w), rel_err(e, w)
        assert err_c <= 2 * err_e + 2e-3, (name, err_c, err_e)


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 128, (2, SEQ), generator=g).cuda()
    labels = ids.clone()
    labels[0, :7] = -100
    return ids, labels


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach().float(), [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["llama", "starcoder2"])
def test_compiled_model_bf16_autocast(family):
    """The whole model compiled (the Trainer's ``torch_compile=True``), bf16 autocast over fp32 weights (the Trainer's
    ``bf16=True``), against the eager Litespark model in float32; no graph break anywhere in the model."""
    oracle, lit = _litespark(family), _litespark(family)
    ids, labels = _batch()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(lit)(input_ids=ids, labels=labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()

    l_o = oracle(input_ids=ids, labels=labels).loss
    l_o.backward()
    g_o = [p.grad.detach().clone() for p in oracle.parameters()]
    l_e, g_e = _loss_and_grads(lit, ids, labels)
    compiled = torch.compile(lit)
    for _ in range(2):  # the second call runs the cached graphs
        l_c, g_c = _loss_and_grads(compiled, ids, labels)
    assert abs(l_c.item() - l_o.item()) <= 2 * abs(l_e.item() - l_o.item()) + 2e-3 * l_o.item()
    for (name, _), gc, ge, go in zip(lit.named_parameters(), g_c, g_e, g_o):
        err_c, err_e = rel_err(gc, go), rel_err(ge, go)
        assert err_c <= 2 * err_e + 2e-3, (name, err_c, err_e)
