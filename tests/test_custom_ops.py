"""The kernels as torch.library custom ops under torch.compile (`litespark_kernels.ops._custom_ops`), on the CPU.

`LITESPARK_FORCE_TRITON=1` sends CPU tensors to the Triton kernels (Triton's CPU interpreter, `TRITON_INTERPRET=1`
from conftest). For every op:
- ``torch.library.opcheck`` of its forward and backward custom ops (schema, fake tensors, autograd registration,
  AOT dispatch with dynamic shapes);
- the op under ``torch.compile(fullgraph=True)`` (no graph break) gives the outputs and input gradients of the eager
  op (its autograd Function), float32: the same kernels run, so the numbers are equal up to rounding order;
- eager calls never go through the custom ops (the eager path keeps the autograd Functions).
A Litespark Llama decoder layer compiled with ``fullgraph=True`` (a graph break inside the layer fails it) gives the
eager Litespark layer's output and gradients, and a model with compiled layers the eager model's loss and gradients.
Sizes are odd (sequence 37, hidden 123) and inputs random and non-zero.
"""

import copy

import pytest
import torch

import litespark_hf
import litespark_kernels as lk
from litespark_kernels.ops import _custom_ops as C
from tiny_models import layer_output_and_grads, tiny_model

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests (tests/gpu/test_custom_ops_gpu.py)"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

B, S, H = 2, 37, 123
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64  # head dim 64: the attention kernel takes it
OPCHECK_TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    C._MODULES.clear()  # every trace as the first one of a process (a traced import would be a graph break)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0, grad=True, scale=1.0):
    t = (torch.randn(*shape, generator=_gen(seed)) * scale).requires_grad_(grad)
    return t


def _heads(n_heads, seed):
    """[B, heads, S, D] as the models hand it over: a transposed view of a [B, S, heads, D] projection output."""
    return rand(B, S, n_heads, HEAD_DIM, seed=seed, grad=False).transpose(1, 2).requires_grad_()


def _labels(seed=5, vocab=50):
    labels = torch.randint(0, vocab, (B, S), generator=_gen(seed))
    labels[0, :5] = -100
    labels[1, -3:] = -100
    return labels


LABELS = _labels()


# name -> (function of the inputs, inputs): the public ops of litespark_kernels
def _cases():
    mask_ids = torch.zeros(B, S, dtype=torch.int32)
    mask_ids[0, 20:] = 1  # two documents in row 0
    mask_ids[1, :4] = -1  # left padding in row 1
    return {
        "rms_norm": (lambda x, w: lk.rms_norm(x, w, 1e-6), (rand(B, S, H), rand(H, seed=1))),
        "rms_norm_offset": (lambda x, w: lk.rms_norm(x, w, 1e-6, offset=1.0), (rand(B, S, H), rand(H, seed=1))),
        "add_rms_norm": (lambda x, r, w: lk.add_rms_norm(x, r, w, 1e-5),
                         (rand(B, S, H), rand(B, S, H, seed=2), rand(H, seed=1))),
        "layer_norm": (lambda x, w, b: lk.layer_norm(x, w, b, 1e-5), (rand(B, S, H), rand(H, seed=1), rand(H, seed=2))),
        "rope": (lambda q, k, c, s: lk.apply_rope(q, k, c, s),
                 (_heads(HEADS, 1), _heads(KV_HEADS, 2), rand(1, S, HEAD_DIM, seed=3, grad=False),
                  rand(1, S, HEAD_DIM, seed=4, grad=False))),
        "swiglu": (lk.swiglu, (rand(B, S, H), rand(B, S, H, seed=1))),
        "geglu": (lk.geglu, (rand(B, S, H), rand(B, S, H, seed=1))),
        "swiglu_packed": (lk.swiglu_packed, (rand(B, S, 2 * H),)),
        "geglu_packed": (lk.geglu_packed, (rand(B, S, 2 * H),)),
        "gelu_tanh_bias": (lk.gelu_tanh_bias, (rand(B, S, H), rand(H, seed=1))),
        "attention": (lambda q, k, v: lk.attention(q, k, v),
                      (_heads(HEADS, 1), _heads(KV_HEADS, 2), _heads(KV_HEADS, 3))),
        "attention_segments_window_softcap": (
            lambda q, k, v: lk.attention(q, k, v, scale=0.1, q_segment_ids=mask_ids, kv_segment_ids=mask_ids,
                                         sliding_window=9, softcap=5.0),
            (_heads(HEADS, 1), _heads(KV_HEADS, 2), _heads(KV_HEADS, 3))),
        "fused_linear": (lambda x, w1, w2, b1: lk.fused_linear(x, [w1, w2], [b1, None]),
                         (rand(B, S, H), rand(40, H, seed=1), rand(24, H, seed=2), rand(40, seed=3))),
        "fused_linear_one": (lambda x, w: lk.fused_linear(x, [w]), (rand(B, S, H), rand(40, H, seed=1))),
        "fused_linear_cross_entropy": (
            lambda h, w, b: lk.fused_linear_cross_entropy(h, w, LABELS, bias=b),
            (rand(B, S, H), rand(50, H, seed=1, scale=0.2), rand(50, seed=2))),
        "fused_linear_cross_entropy_items_softcap": (
            lambda h, w: lk.fused_linear_cross_entropy(h, w, LABELS, num_items_in_batch=torch.tensor(61),
                                                       softcap=3.0),
            (rand(B, S, H), rand(50, H, seed=1, scale=0.2))),
    }


CASES = _cases()


def _outputs_and_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    weights = [torch.randn(o.shape, generator=_gen(100 + i)) for i, o in enumerate(outs)]
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights))
    diff = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss, diff)
    return [o.detach() for o in outs], list(grads)


def _assert_same(got, want, rtol=1e-6, atol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol)


def _recording(backend: str, seen: list):
    """A torch.compile backend that records the ops of Dynamo's graph, then compiles it with ``backend``."""
    from torch._dynamo.backends.registry import lookup_backend

    def compile_fn(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return lookup_backend(backend)(gm, example_inputs)

    return compile_fn


# Inductor on this CPU: the ops not inside the decoder layer test below (which runs Inductor over the others)
INDUCTOR_CASES = ["layer_norm", "gelu_tanh_bias", "geglu", "fused_linear_cross_entropy_items_softcap"]


@pytest.mark.parametrize("backend,name", [("aot_eager", n) for n in CASES] + [("inductor", n) for n in INDUCTOR_CASES])
def test_compiled_op_matches_eager(backend, name):
    fn, inputs = CASES[name]
    want = _outputs_and_grads(fn, inputs)
    seen = []
    compiled = torch.compile(fn, fullgraph=True, backend=_recording(backend, seen))
    got = _outputs_and_grads(compiled, inputs)
    assert any(op.startswith("litespark.") for op in seen), seen  # traced through a custom op
    _assert_same(got[0], want[0])
    _assert_same(got[1], want[1])


def test_compiled_fused_linear_under_autocast_matches_eager():
    """bf16 autocast over fp32 weights: the same bf16 GEMMs, fp32 weight gradients written by the GEMM."""

    def fn(x, w1, w2, b1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = lk.fused_linear(lk.rms_norm(x, w1[0], out_dtype=torch.bfloat16), [w1, w2], [b1, None])
        assert y.dtype == torch.bfloat16
        return y

    inputs = (rand(B, S, H), rand(40, H, seed=1), rand(24, H, seed=2), rand(40, seed=3))
    want = _outputs_and_grads(fn, inputs)
    got = _outputs_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), inputs)
    _assert_same(got[0], want[0], rtol=0, atol=0)
    _assert_same(got[1], want[1], rtol=0, atol=0)


def test_eager_calls_keep_the_autograd_functions():
    x, w = rand(B, S, H), rand(H, seed=1)
    assert "RMSNormFunction" in type(lk.rms_norm(x, w).grad_fn).__name__
    assert "_FusedLinear" in type(lk.fused_linear(x, [rand(8, H)]).grad_fn).__name__


def test_compiled_graph_calls_the_custom_ops():
    """Inside the traced graph the kernels are the litespark:: custom ops."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm

    x, w, r = rand(B, S, H), rand(H, seed=1), rand(B, S, H, seed=2)
    torch.compile(lambda x, r, w: lk.add_rms_norm(x, r, w)[0] + lk.rms_norm(x, w), fullgraph=True,
                  backend=backend)(x, r, w)
    assert "litespark.add_rms_norm_fwd.default" in seen and "litespark.rms_norm_fwd.default" in seen


# ---------------------------------------------------------------------------------------------------------------
# opcheck of every forward and backward op
# ---------------------------------------------------------------------------------------------------------------


def _plain(*ts):
    return tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t for t in ts)


def _opcheck_cases():
    x, w, r, b = rand(B, S, H), rand(H, seed=1), rand(B, S, H, seed=2), rand(H, seed=3)
    q, k, v = _heads(HEADS, 1), _heads(KV_HEADS, 2), _heads(KV_HEADS, 3)
    cos, sin = rand(1, S, HEAD_DIM, seed=4, grad=False), rand(1, S, HEAD_DIM, seed=5, grad=False)
    gu = rand(B, S, 2 * H, seed=6)
    dy = rand(B, S, H, seed=7, grad=False)
    rstd = C.rms_norm_fwd(*_plain(x, w), 1e-6, None, None)[1]
    s = (x + r).detach()
    ln = C.layer_norm_fwd(*_plain(x, w, b), 1e-5)
    segs = torch.zeros(B, S, dtype=torch.int32)
    segs[0, 20:] = 1
    attn_args = (0.125, True, segs, segs, 9, 5.0)
    out, lse = C.attention_fwd(*_plain(q, k, v), *attn_args)
    w1, w2, b1 = rand(40, H, seed=8), rand(24, H, seed=9), rand(40, seed=10)
    target = _labels().reshape(-1)
    head_w, head_b = rand(50, H, seed=11, scale=0.2), rand(50, seed=12)
    silu = C._act("silu")
    return {
        "rms_norm_fwd": (C.rms_norm_fwd, (x, w, 1e-6, None, None)),
        "rms_norm_fwd_offset_out_dtype": (C.rms_norm_fwd, (x, w, 1e-6, torch.bfloat16, 1.0)),
        "rms_norm_bwd": (C.rms_norm_bwd, _plain(dy, x, w, rstd) + (None,)),
        "add_rms_norm_fwd": (C.add_rms_norm_fwd, (x, r, w, 1e-6, None, None)),
        "add_rms_norm_bwd": (C.add_rms_norm_bwd, _plain(dy, dy * 0.5, s, w, rstd) + (torch.bfloat16, None)),
        "layer_norm_fwd": (C.layer_norm_fwd, (x, w, b, 1e-5)),
        "layer_norm_bwd": (C.layer_norm_bwd, _plain(dy, x, w, ln[1], ln[2]) + (True,)),
        "rope_fwd": (C.rope_fwd, (q, k, cos, sin)),
        "rope_bwd": (C.rope_bwd, _plain(q, k, cos, sin)),
        "glu_fwd": (C.glu_fwd, (x, r, silu)),
        "glu_bwd": (C.glu_bwd, _plain(dy, x, r) + (C._act("gelu"),)),
        "glu_packed_fwd": (C.glu_packed_fwd, (gu, silu)),
        "glu_packed_bwd": (C.glu_packed_bwd, _plain(dy, gu) + (silu,)),
        "gelu_tanh_bias_fwd": (C.gelu_tanh_bias_fwd, (x, b)),
        "gelu_tanh_bias_bwd": (C.gelu_tanh_bias_bwd, _plain(dy, x, b)),
        "attention_fwd": (C.attention_fwd, (q, k, v) + attn_args),
        "attention_bwd": (C.attention_bwd, _plain(out, q, k, v, out, lse) + attn_args),
        "fused_linear_fwd": (C.fused_linear_fwd, (x, [w1, w2], [b1], [True, False], None, torch.float32)),
        "fused_linear_fwd_bf16": (C.fused_linear_fwd, (x, [w1], [], [False], None, torch.bfloat16)),
        "fused_linear_bwd": (C.fused_linear_bwd, _plain(rand(B, S, 64, seed=13, grad=False), x.reshape(-1, H),
                                                        torch.cat([w1, w2])) + (torch.float32, torch.float32, True,
                                                                                True, True)),
        "fused_linear_cross_entropy_fwd": (
            C.fused_linear_cross_entropy_fwd,
            (x, head_w, head_b, target, -100, None, None, torch.float32, None, None, True, True, True)),
        "fused_linear_cross_entropy_fwd_items_softcap": (
            C.fused_linear_cross_entropy_fwd,
            (x, head_w, None, target, -100, torch.tensor(61), None, torch.float32, None, 3.0, True, True, False)),
    }


OPCHECK = _opcheck_cases()


@pytest.mark.parametrize("name", list(OPCHECK))
def test_opcheck(name):
    op, args = OPCHECK[name]
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def test_every_custom_op_is_checked():
    ops = {n for n in dir(torch.ops.litespark) if not n.startswith("_")} - {"name"}
    checked = {op._name for op, _ in OPCHECK.values()}
    assert ops <= checked, ops - checked


# ---------------------------------------------------------------------------------------------------------------
# A Litespark Llama decoder layer and a model
# ---------------------------------------------------------------------------------------------------------------

LAYER_SIZE = dict(hidden_size=H, intermediate_size=160, num_attention_heads=3, num_key_value_heads=1,
                  head_dim=HEAD_DIM, num_hidden_layers=2)


def _litespark_model():
    model = tiny_model("llama", attn_implementation="sdpa", **LAYER_SIZE)
    litespark_hf.apply(model)
    model.train()
    return model


def _layer_inputs(model):
    hidden = rand(B, S, H, seed=3)
    pos = torch.arange(S)[None]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(hidden, pos)
    return hidden, pos, (cos, sin)


def _run_layer(layer, hidden, pos, emb):
    out, *grads = layer_output_and_grads(layer, hidden, pos, emb, seed=7)
    return out, grads


LAYER_OPS = {f"litespark.{op}.default" for op in ("rms_norm_fwd", "add_rms_norm_fwd", "fused_linear_fwd", "rope_fwd",
                                                 "attention_fwd", "glu_packed_fwd")}


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_decoder_layer_compiles_without_graph_break(backend):
    model = _litespark_model()
    layer = model.model.layers[1]  # the last layer: its MLP add goes to the model's final norm in eager
    hidden, pos, emb = _layer_inputs(model)
    explained = torch._dynamo.explain(layer)(hidden, attention_mask=None, position_ids=pos, position_embeddings=emb)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    traced = {str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"}
    assert LAYER_OPS <= traced, LAYER_OPS - traced  # every kernel of the layer, as a custom op
    want = _run_layer(layer, hidden, pos, emb)
    model.model.norm.__dict__.pop("_litespark_prenormed", None)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend=backend)
    got = _run_layer(compiled, hidden, pos, emb)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def _loss_and_grads(model, ids=None, labels=None, **batch):
    loss = model(input_ids=batch.pop("input_ids", ids), labels=batch.pop("labels", labels), **batch).loss
    loss.backward()
    return loss.detach(), [p.grad.detach().clone() for p in model.parameters()]


def test_model_with_compiled_layers_matches_eager():
    """Each decoder layer compiled on its own with fullgraph=True (as a per-layer compile would); the loss and every
    parameter gradient equal the eager Litespark model's."""
    eager = _litespark_model()
    compiled = copy.deepcopy(eager)
    for layer in compiled.model.layers:
        layer.compile(fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 128, (B, S), generator=_gen(11))
    labels = ids.clone()
    labels[0, :3] = -100
    l0, g0 = _loss_and_grads(eager, ids, labels)
    l1, g1 = _loss_and_grads(compiled, ids, labels)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# No graph break in a decoder layer (Llama, Qwen3) nor in the whole causal LM forward with labels (Llama, StarCoder2,
# tied Llama with a padded batch), as the GPU test (tests/gpu/test_custom_ops_gpu.py) checks them: bf16 layers, the
# model under bf16 autocast over fp32 weights (CPU autocast here). The Triton paths run in the interpreter
# (`LITESPARK_FORCE_TRITON`, as on CUDA); the fused-loss forward's CUDA-only steps (pinned label count, weight casts,
# CastShadow) are skipped under compile on every device, so the CPU takes the GPU's traced path.
# ---------------------------------------------------------------------------------------------------------------

# What torch 2.11's Dynamo (the GPU machine's) traces on an object's ``__dict__``: ``d[k]``, ``d.get(k)``, ``k in d``
# and ``d[k] = v``; any other method (``pop``: the breaks found on the H200) is a graph break there, while 2.13
# traces them all. `_dynamo_2_11_dunder_dict` makes this torch refuse them too, so the CPU run catches such breaks.
_DUNDER_DICT_2_11 = frozenset({"__getitem__", "get", "__contains__", "__setitem__"})


@pytest.fixture
def _dynamo_2_11_dunder_dict(monkeypatch):
    dunder = getattr(torch._dynamo.variables, "DunderDictVariable", None)
    if dunder is None:  # a torch whose Dynamo has no such variable (2.11 itself): its own limits apply
        return
    from torch._dynamo.exc import unimplemented

    original = dunder.call_method

    def call_method(self, tx, name, args, kwargs):
        if name not in _DUNDER_DICT_2_11:
            unimplemented(gb_type="__dict__ method torch 2.11 does not trace", context=f"__dict__.{name}",
                          explanation=f"torch 2.11's Dynamo graph-breaks on obj.__dict__.{name}(...)", hints=[])
        return original(self, tx, name, args, kwargs)

    monkeypatch.setattr(dunder, "call_method", call_method)


def test_dunder_dict_emulation_breaks_on_pop(_dynamo_2_11_dunder_dict):
    """The emulation above turns a module's ``__dict__.pop`` into a graph break (as torch 2.11 does)."""
    mod = torch.nn.Linear(4, 4)

    def fn(x):
        y = x * 2
        mod.__dict__.pop("_not_there", None)
        return y + 1

    explained = torch._dynamo.explain(fn)(torch.ones(3))
    assert explained.graph_break_count == 1, explained


def _gpu_like_model(family, **overrides):
    model = tiny_model(family, attn_implementation="sdpa", **{**LAYER_SIZE, **overrides})
    litespark_hf.apply(model)
    return model.train()


def _no_break(explained):
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    return {str(n.target) for n in explained.graphs[0].graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bf16_decoder_layer_has_no_graph_break(family, _dynamo_2_11_dunder_dict):
    """The GPU test's bf16 layer (qwen3: per-head q/k norms, each a `LitesparkRMSNorm` call)."""
    model = _gpu_like_model(family).to(torch.bfloat16)
    layer = model.model.layers[-1]
    hidden, pos, emb = _layer_inputs(model)
    hidden, emb = hidden.detach().bfloat16(), tuple(t.bfloat16() for t in emb)
    traced = _no_break(torch._dynamo.explain(layer)(hidden, attention_mask=None, position_ids=pos,
                                                    position_embeddings=emb))
    ops = {"litespark.fused_linear_fwd.default", "litespark.rope_fwd.default", "litespark.attention_fwd.default"}
    if family == "qwen3":
        ops.add("litespark.rms_norm_fwd.default")
    assert ops <= traced, ops - traced


def _batch(padded=False):
    ids = torch.randint(0, 128, (B, S), generator=_gen(11))
    labels = ids.clone()
    labels[0, :3] = -100
    if not padded:
        return dict(input_ids=ids, labels=labels)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :6] = 0  # left padding: eager would unpad (LITESPARK_UNPAD_CPU=1), compile keeps the padded batch
    return dict(input_ids=ids, labels=labels.masked_fill(mask == 0, -100), attention_mask=mask)


MODEL_CASES = {"llama": ("llama", {}, False), "starcoder2": ("starcoder2", {}, False),
               "llama_tied_padded": ("llama", {"tie_word_embeddings": True}, True)}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_causal_lm_forward_with_labels_has_no_graph_break(case, _dynamo_2_11_dunder_dict):
    """The whole fused-loss forward (the Trainer's ``torch_compile=True`` compiles the model) under bf16 autocast
    over fp32 weights: one graph from the labels to the loss, through the unpadding hooks, the decoder layers (their
    norms' fused-add stash), the tied-embedding slot and the fused loss."""
    family, overrides, padded = MODEL_CASES[case]
    model = _gpu_like_model(family, **overrides)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(**_batch(padded))
    graphs = explained.graphs
    if padded:
        # the causal LM's own pre-hook (`label_pre_hook`: labels after a pad ignored) is a frame of its own, as
        # ``torch.compile(model)`` runs it (the root module's hooks are called outside the compiled forward)
        assert explained.graph_count == 2 and not explained.break_reasons, explained.break_reasons
        hook_ops = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
        assert not any(op.startswith("litespark.") for op in hook_ops), hook_ops
        explained.graph_count, explained.graph_break_count, explained.graphs = 1, 0, graphs[1:]
    traced = _no_break(explained)
    assert "litespark.fused_linear_cross_entropy_fwd.default" in traced, traced
    assert "litespark.attention_fwd.default" in traced, traced


def test_compiled_causal_lm_matches_eager():
    """``torch.compile(model, fullgraph=True)`` (aot_eager) of the whole fused-loss forward and its backward: the
    eager model's loss and gradients. float32: Triton's CPU interpreter gets bf16 attention wrong (relative error
    ~1e9 against the reference, eager and compiled alike), so the bf16 numbers are left to the GPU test."""
    eager = _gpu_like_model("llama")
    compiled = copy.deepcopy(eager)
    batch = _batch()
    l0, g0 = _loss_and_grads(eager, **batch)
    l1, g1 = _loss_and_grads(torch.compile(compiled, fullgraph=True, backend="aot_eager"), **batch)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
