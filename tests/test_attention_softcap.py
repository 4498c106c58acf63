"""Attention logit soft-capping (Gemma-2: s -> cap * tanh(s / cap) on the scaled scores, before the mask) in the
Triton attention kernel, forward and backward, in Triton's CPU interpreter.

The kernel against ``attention_reference`` (as tests/test_attention_kernel.py: fp32 copies of the inputs, gradients
through autograd, relative Frobenius error; fp32 1e-5, fp16 3e-3) with every mode the kernel has; the reference
against transformers' own eager Gemma-2 attention; the dispatcher's fallback (it must keep the soft-cap); a tiny
Gemma-2 with the `litespark` backend on the kernel against stock eager (1e-4, as tests/test_families_gemma.py).
Queries are scaled up (``Q_GAIN``) so that the scores reach the cap: the capped and uncapped attentions differ by
far more than the tolerances (checked in ``_compare``).
"""

import copy
import importlib

import pytest
import torch

from litespark_kernels.ops import _attention_triton as at
from litespark_kernels.ops._attention_triton import attention_triton
from litespark_kernels.ops.attention import attention, attention_reference
from tiny_models import attention_inputs

A = importlib.import_module("litespark_kernels.ops.attention")  # the module (the package re-exports the function)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}
CAP = 2.0
Q_GAIN = 4.0  # scaled scores of about +-4 (D=64): tanh(s / 2) saturates on many of them


def _inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0, gain=Q_GAIN):
    return attention_inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed, q_gain=gain)


def _rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-20)).item()


def _compare(q, k, v, do, softcap=CAP, sensitive=True, tol=None, **kw):
    """Kernel vs oracle with ``softcap``, forward and backward; returns the kernel's (out, dq, dk, dv)."""
    out = attention_triton(q, k, v, softcap=softcap, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qf, kf, vf, softcap=softcap, **kw)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    tol = TOL[q.dtype] if tol is None else tol
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert x.dtype == q.dtype and x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        err = _rel(x, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    if sensitive:  # the soft-cap changes the result by far more than the tolerance
        uncapped = attention_reference(qf.detach(), kf.detach(), vf.detach(), **kw)
        assert _rel(uncapped, ref.detach()) > 100 * tol
    return (out, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
def test_dense_gqa_odd_length(dtype, causal):
    _compare(*_inputs(2, 4, 2, 45, 45, 64, dtype), causal=causal)


def test_dense_mha_head_dim_128():
    _compare(*_inputs(1, 2, 2, 45, 45, 128, torch.float32, seed=14), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Sq,Skv", [(19, 53), (53, 19), (1, 37)])
def test_q_and_kv_lengths_differ(dtype, Sq, Skv):
    out, dq, _, _ = _compare(*_inputs(1, 4, 2, Sq, Skv, 80, dtype, seed=1), causal=True)
    if Sq > Skv:  # bottom-right-aligned causality: the first Sq - Skv queries see no key
        assert (out[:, : Sq - Skv] == 0).all() and (dq[:, :, : Sq - Skv] == 0).all()


def test_sequence_of_one_token():
    # One key: the softmax is 1 whatever the (capped) score, so out = v, dv = dO summed over the group, dq = dk = 0.
    q, k, v, do = _inputs(2, 4, 2, 1, 1, 64, torch.float32, seed=1)
    out = attention_triton(q, k, v, causal=True, softcap=CAP)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    torch.testing.assert_close(out, v.detach().repeat_interleave(2, 1).transpose(1, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dv, do.transpose(1, 2).unflatten(1, (2, 2)).sum(2), rtol=1e-6, atol=1e-6)
    assert dq.abs().max() < 1e-5 and dk.abs().max() < 1e-5


def test_sequence_1000():
    _compare(*_inputs(1, 2, 1, 1000, 1000, 64, torch.float32, seed=2), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_padding_and_packed_documents(dtype):
    # Row 0: three documents; row 1: left padding, two documents, right padding.
    seg = torch.tensor([[0] * 13 + [1] * 30 + [2] * 21, [-1] * 5 + [0] * 35 + [1] * 9 + [-1] * 15], dtype=torch.int32)
    out, dq, dk, dv = _compare(*_inputs(2, 4, 2, 64, 64, 64, dtype, seed=3), causal=True,
                               q_segment_ids=seg, kv_segment_ids=seg)
    pad = seg < 0
    assert (out[pad] == 0).all() and (dq.transpose(1, 2)[pad] == 0).all()
    assert (dk.transpose(1, 2)[pad] == 0).all() and (dv.transpose(1, 2)[pad] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [3, 24])
def test_sliding_window(dtype, window):
    _compare(*_inputs(1, 4, 2, 61, 61, 64, dtype, seed=4), causal=True, sliding_window=window)


def test_window_kv_longer_and_packing_noncausal_scale():
    seg_q = torch.tensor([[0] * 10 + [1] * 27], dtype=torch.int32)
    seg_kv = torch.tensor([[-1] * 20 + [0] * 23 + [1] * 27], dtype=torch.int32)
    _compare(*_inputs(1, 4, 2, 37, 70, 96, torch.float32, seed=5), causal=True, sliding_window=19,
             q_segment_ids=seg_q, kv_segment_ids=seg_kv, scale=0.2)
    _compare(*_inputs(1, 2, 1, 40, 40, 64, torch.float32, seed=6), causal=False, sliding_window=9, scale=0.2)


@pytest.mark.parametrize("split", [True, False])
def test_both_loop_structures(monkeypatch, split):
    monkeypatch.setitem(at.INTERPRETER_CONFIGS, "short", (16, 16, 4, 1, split))
    seg = torch.tensor([[-1] * 6 + [0] * 40 + [1] * 30], dtype=torch.int32)
    _compare(*_inputs(1, 4, 2, 76, 76, 64, torch.float16, seed=7), causal=True, sliding_window=33,
             q_segment_ids=seg, kv_segment_ids=seg)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # numpy, in the interpreter
def test_saturated_scores_stay_finite():
    # Scaled scores of +-100 against a cap of 0.5: 2^(2 log2(e) s / cap) overflows to inf in the kernel's tanh, which
    # must give t = +-1 exactly (and a zero score gradient), never NaN.
    # Tolerance 1e-4: the gradients come from the few unsaturated scores, whose tanh argument carries float32's error
    # on products of size 1e3; against a float64 computation the kernel and the float32 reference are both ~2.5e-5
    # off (dq, dk), and 1.5e-5 from each other.
    q, k, v, do = _inputs(1, 2, 1, 33, 33, 64, torch.float32, seed=8, gain=100.0)
    _compare(q, k, v, do, softcap=0.5, causal=True, tol=1e-4)


def test_gemma2_cap_at_its_real_value():
    # Gemma-2's cap of 50 with ordinary scores: the cap barely bites, the kernel still matches.
    _compare(*_inputs(2, 4, 2, 45, 45, 64, torch.float16, seed=9, gain=1.0), softcap=50.0, sensitive=False,
             causal=True)


def test_reference_is_transformers_gemma2_eager_attention():
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    class Module(torch.nn.Module):
        head_dim, num_key_value_groups = 32, 2

    q, k, v, _ = _inputs(2, 4, 2, 21, 21, 32, torch.float64, seed=10)
    seg = torch.tensor([[0] * 21, [-1] * 4 + [0] * 17], dtype=torch.int32)
    allowed = A.visibility_mask(21, 21, causal=True, q_segment_ids=seg, kv_segment_ids=seg, sliding_window=6)
    additive = torch.zeros(allowed.shape, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    module = Module().eval()
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=0.3, softcap=CAP)
    got = attention_reference(q, k, v, scale=0.3, causal=True, q_segment_ids=seg, kv_segment_ids=seg,
                              sliding_window=6, softcap=CAP)
    valid = seg >= 0  # eager gives padding queries (no visible key) a uniform softmax; the reference gives zeros
    torch.testing.assert_close(got.float()[valid], want.float()[valid], rtol=1e-6, atol=1e-6)
    assert (got[~valid] == 0).all()


def test_dispatcher_runs_the_kernel_with_softcap(monkeypatch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    seen = []
    real = at.TritonAttention.apply
    monkeypatch.setattr(at.TritonAttention, "apply", lambda *args: seen.append(args[-1]) or real(*args))
    q, k, v, _ = _inputs(1, 4, 2, 24, 24, 64, torch.float32, seed=11)
    out = attention(q, k, v, causal=True, softcap=CAP)
    ref = attention_reference(q.detach(), k.detach(), v.detach(), causal=True, softcap=CAP)
    assert seen == [CAP] and _rel(out, ref) < 1e-5


@pytest.mark.parametrize("force", [True, False])
def test_fallbacks_keep_the_softcap(monkeypatch, force):
    """Inputs the kernel does not take (head dim 32; CPU tensors without LITESPARK_FORCE_TRITON) run the reference
    with the soft-cap, never SDPA without it."""
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1" if force else "0")
    q, k, v, _ = _inputs(1, 4, 2, 24, 24, 32 if force else 64, torch.float32, seed=12)
    out = attention(q, k, v, causal=True, softcap=CAP)
    ref = attention_reference(q, k, v, causal=True, softcap=CAP)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_dropout_with_softcap_runs_the_reference():
    q, k, v, do = _inputs(1, 2, 1, 16, 16, 64, torch.float32, seed=13)
    torch.manual_seed(0)
    out = attention_triton(q, k, v, causal=True, dropout_p=0.3, softcap=CAP)
    torch.manual_seed(0)
    ref = attention_reference(q, k, v, causal=True, dropout_p=0.3, softcap=CAP)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_nonpositive_softcap_is_refused(bad):
    q, k, v, _ = _inputs(1, 2, 1, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="softcap"):
        attention_triton(q, k, v, softcap=bad)
    with pytest.raises(ValueError, match="softcap"):
        attention_reference(q, k, v, softcap=bad)


# ---------------------------------------------------------------------------------------------------------------
# The backend on a tiny Gemma-2 (head dim 64, so that the kernel takes it), against stock eager
# ---------------------------------------------------------------------------------------------------------------


def _gemma2_pair():
    import litespark_hf
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "gemma2", vocab_size=128, hidden_size=128, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=64, query_pre_attn_scalar=48, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=5.0,
        final_logit_softcapping=None, max_position_embeddings=128, pad_token_id=0,
        hidden_activation="gelu_pytorch_tanh",
    )
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float()
    with torch.no_grad():  # scores of a trained model's size, so that the cap of 5 bites
        for layer in stock.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    assert lit.config._attn_implementation == "litespark"
    return stock, lit


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("batch", ["padded", "packed"])
def test_tiny_gemma2_on_the_kernel_matches_stock_eager(monkeypatch, batch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    stock, lit = _gemma2_pair()
    seen = []
    real = at.TritonAttention.apply
    monkeypatch.setattr(at.TritonAttention, "apply", lambda *args: seen.append(args[-1]) or real(*args))
    g = torch.Generator().manual_seed(1)
    if batch == "padded":
        ids = torch.randint(1, 128, (2, 20), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -4:] = 0
        mask[1, :3] = 0
        inputs = dict(input_ids=ids, attention_mask=mask)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
        valid = mask.bool()
    else:
        lengths = [7, 10, 9]
        ids = torch.randint(1, 128, (1, sum(lengths)), generator=g)
        inputs = dict(input_ids=ids, position_ids=torch.cat([torch.arange(n) for n in lengths])[None], use_cache=False)
        labels = ids.clone()
        labels[0, torch.tensor([0] + lengths[:-1]).cumsum(0)] = -100
        valid = torch.ones_like(ids, dtype=torch.bool)
    stock.train(), lit.train()
    logits_a, logits_b = stock(**inputs).logits, lit(**inputs).logits
    assert seen and set(seen) == {5.0}  # every attention call ran the kernel, with the cap
    assert _rel(logits_b[valid], logits_a[valid]) <= 1e-4
    with torch.no_grad():  # sensitivity: without the cap the logits differ by far more than the tolerance
        for layer in stock.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        assert _rel(stock(**inputs).logits[valid], logits_a[valid]) > 1e-3
        for layer in stock.model.layers:
            layer.self_attn.attn_logit_softcapping = 5.0
    loss_a, loss_b = (torch.nn.functional.cross_entropy(x[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
                      for x in (logits_a, logits_b))
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * loss_a.item()
    loss_a.backward()
    loss_b.backward()
    for (name, pa), pb in zip(stock.named_parameters(), lit.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
        elif pa.grad.norm() < 1e-6:
            assert (pb.grad - pa.grad).norm() < 1e-6, name
        else:
            assert _rel(pb.grad, pa.grad) <= 1e-4, name
