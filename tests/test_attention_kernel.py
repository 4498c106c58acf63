"""Triton attention kernel (forward and backward) against ``attention_reference``, in Triton's CPU interpreter.

fp32 and fp16 inputs (the interpreter's bf16 ``tl.dot`` is unreliable: bf16 runs in tests/gpu). The oracle is
``attention_reference`` on fp32 copies of the inputs; gradients come from autograd through it. Tolerances on the
relative Frobenius error ||x - ref|| / ||ref||: fp32 1e-5 (seen ~5e-7), fp16 3e-3 (seen ~3e-4: fp16 output and
fp16 probabilities fed to the second matrix product).
"""

import os

import pytest
import torch

from litespark_kernels.ops._attention_triton import attention_triton
from litespark_kernels.ops.attention import attention, attention_reference
from tiny_models import attention_inputs

TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


_inputs = attention_inputs


def _rel(x, ref):
    return ((x.float() - ref).norm() / ref.norm().clamp_min(1e-20)).item()


def _compare(q, k, v, do, **kw):
    """Run kernel and oracle forward + backward; assert closeness; return kernel's (out, dq, dk, dv)."""
    out = attention_triton(q, k, v, **kw)
    assert out.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3]) and out.is_contiguous()
    grads = torch.autograd.grad(out, (q, k, v), do)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attention_reference(qf, kf, vf, **kw)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), do.float())
    tol = TOL[q.dtype]
    for name, x, r in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads)):
        assert x.dtype == q.dtype and x.shape == r.shape, name
        assert torch.isfinite(x).all(), f"{name} has non-finite values"
        err = _rel(x, r)
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"
    return (out, *grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Hq,Hkv", [(4, 2), (2, 2)])
@pytest.mark.parametrize("D", [64, 80])
def test_dense_gqa_odd_length(dtype, causal, Hq, Hkv, D):
    _compare(*_inputs(2, Hq, Hkv, 45, 45, D, dtype), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_head_dim_256_padded_window_softcap(dtype):
    """Head dim 256 (Gemma 2/3, the kernel's own launch configuration): causal GQA with left padding, a sliding window
    shorter than the row and Gemma-2's soft-cap."""
    q, k, v, do = _inputs(2, 4, 2, 45, 45, 256, dtype, seed=3)
    pos = torch.arange(45)[None]
    seg = torch.where(pos >= torch.tensor([[0], [13]]), 0, -1).to(torch.int32)
    out, *_ = _compare(q, k, v, do, causal=True, q_segment_ids=seg, kv_segment_ids=seg, sliding_window=9,
                       softcap=5.0, scale=4 * 256**-0.5)
    assert (out[seg < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Sq,Skv", [(19, 53), (53, 19), (1, 37)])
@pytest.mark.parametrize("causal", [True, False])
def test_q_and_kv_lengths_differ(dtype, Sq, Skv, causal):
    # Bottom-right-aligned causality: with Sq > Skv, the first Sq - Skv queries see no key (output 0).
    out, dq, _, _ = _compare(*_inputs(1, 4, 2, Sq, Skv, 96, dtype, seed=1), causal=causal)
    if causal and Sq > Skv:
        assert (out[:, : Sq - Skv] == 0).all() and (dq[:, :, : Sq - Skv] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
def test_sequence_1000(causal):
    _compare(*_inputs(1, 2, 1, 1000, 1000, 64, torch.float32, seed=2), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_via_segment_ids(dtype, side):
    B, S = 2, 50
    lengths = torch.tensor([50, 31])
    pos = torch.arange(S)[None]
    if side == "right":
        mask = pos < lengths[:, None]
    else:
        mask = pos >= (S - lengths)[:, None]
    seg = torch.where(mask, 0, -1).to(torch.int32)
    q, k, v, do = _inputs(B, 4, 2, S, S, 64, dtype, seed=3)
    out, dq, dk, dv = _compare(q, k, v, do, causal=True, q_segment_ids=seg, kv_segment_ids=seg)
    pad = ~mask
    # Padding queries output 0 and get no gradient; padding keys get no gradient.
    assert (out[pad] == 0).all()
    assert (dq.transpose(1, 2)[pad] == 0).all()
    assert (dk.transpose(1, 2)[pad] == 0).all() and (dv.transpose(1, 2)[pad] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_documents(dtype):
    # Row 0: three documents; row 1: two documents then right padding.
    seg = torch.tensor(
        [[0] * 13 + [1] * 30 + [2] * 21, [0] * 40 + [1] * 9 + [-1] * 15], dtype=torch.int32
    )
    _compare(*_inputs(2, 4, 2, 64, 64, 64, dtype, seed=4), causal=True, q_segment_ids=seg, kv_segment_ids=seg)


def test_packed_documents_long_row():
    # Documents that span many blocks, so that the segment-range block skipping is exercised.
    seg = torch.cat([torch.full((n,), i) for i, n in enumerate([300, 421, 229])] + [torch.full((50,), -1)])
    seg = seg.to(torch.int32)[None]
    _compare(
        *_inputs(1, 2, 1, 1000, 1000, 64, torch.float16, seed=5), causal=True, q_segment_ids=seg, kv_segment_ids=seg
    )


def test_unsorted_segment_ids():
    # Ids need not be sorted: any equal ids attend each other (the block skipping must stay conservative).
    g = torch.Generator().manual_seed(6)
    seg = torch.randint(-1, 3, (2, 40), generator=g, dtype=torch.int32)
    _compare(*_inputs(2, 2, 1, 40, 40, 64, torch.float32, seed=6), causal=False, q_segment_ids=seg, kv_segment_ids=seg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window", [2, 7, 24])
def test_sliding_window(dtype, window):
    _compare(*_inputs(1, 4, 2, 61, 61, 64, dtype, seed=7), causal=True, sliding_window=window)


def test_sliding_window_long_kv_and_packing():
    seg_q = torch.tensor([[0] * 10 + [1] * 27], dtype=torch.int32)
    seg_kv = torch.tensor([[-1] * 20 + [0] * 23 + [1] * 27], dtype=torch.int32)
    _compare(
        *_inputs(1, 4, 2, 37, 70, 80, torch.float32, seed=8),
        causal=True, sliding_window=19, q_segment_ids=seg_q, kv_segment_ids=seg_kv,
    )


def test_noncausal_window():
    _compare(*_inputs(1, 2, 2, 40, 40, 64, torch.float32, seed=9), causal=False, sliding_window=9)


def test_strided_inputs_as_transformers_hands_them():
    # transformers gives q/k/v as [B, H, S, D] transposes of [B, S, H, D] projections: no copy is needed.
    g = torch.Generator().manual_seed(10)
    B, S, Hq, Hkv, D = 2, 33, 4, 2, 64
    q = torch.randn(B, S, Hq, D, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(B, S, Hkv, D, generator=g).transpose(1, 2).requires_grad_()
    do = torch.randn(B, S, Hq, D, generator=g)
    _, dq, dk, dv = _compare(q, k, v, do, causal=True, scale=0.3)
    assert dq.stride() == q.stride() and dk.stride() == k.stride()


def test_shared_segment_ids_broadcast_over_batch():
    seg = torch.tensor([[0] * 20 + [1] * 12], dtype=torch.int32)  # [1, S] for a batch of 2
    _compare(*_inputs(2, 2, 1, 32, 32, 64, torch.float32, seed=11), causal=True, q_segment_ids=seg, kv_segment_ids=seg)


def test_dispatcher_runs_the_kernel(monkeypatch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    assert os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
    q, k, v, _ = _inputs(1, 4, 2, 24, 24, 64, torch.float32, seed=12)
    out = attention(q, k, v, causal=True)
    ref = attention_reference(q.detach(), k.detach(), v.detach(), causal=True)
    assert _rel(out, ref) < 1e-5


def test_dropout_falls_back_to_sdpa():
    q, k, v, do = _inputs(1, 2, 1, 16, 16, 64, torch.float32, seed=13)
    out = attention_triton(q, k, v, causal=True, dropout_p=0.5)
    assert out.shape == (1, 16, 2, 64) and torch.isfinite(out).all()
    out.backward(do)
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("split", [True, False])
def test_both_loop_structures(monkeypatch, split):
    # SPLIT=True: three specialised loops (masked / unmasked / masked); False: one loop with a runtime mask branch.
    from litespark_kernels.ops import _attention_triton as at

    monkeypatch.setitem(at.INTERPRETER_CONFIGS, "short", (16, 16, 4, 1, split))
    seg = torch.tensor([[-1] * 6 + [0] * 40 + [1] * 30], dtype=torch.int32)
    _compare(*_inputs(1, 4, 2, 76, 76, 64, torch.float32, seed=14), causal=True, sliding_window=21)
    _compare(
        *_inputs(1, 4, 2, 76, 76, 64, torch.float16, seed=15),
        causal=True, sliding_window=33, q_segment_ids=seg, kv_segment_ids=seg,
    )


def test_window_covering_the_sequence_is_no_window():
    """A window >= the key length hides nothing: same result as no window, and the SDPA fallback takes the unmasked
    (is_causal) path, which keeps SDPA's flash backend (StarCoder2: window 4096 on 2048-token rows, dropout 0.1)."""
    import importlib
    from unittest import mock

    A = importlib.import_module("litespark_kernels.ops.attention")  # the module (the package re-exports the function)

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    ref = A.attention_reference(q, k, v, sliding_window=None)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", spy):
        out = A.attention_sdpa(q, k, v, sliding_window=40)
    assert calls == [None]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert A.effective_window(39, 40) == 39 and A.effective_window(40, 40) is None


@pytest.mark.parametrize("smem,large", [(227 * 1024, True), (163 * 1024, False), (99 * 1024, False)])
def test_head_dim_256_configs_follow_shared_memory(monkeypatch, smem, large):
    """Head dim 256: the 128-row forward and dQ tiles only where a block may use >= 200 KiB of shared memory (the
    H100/H200's 227 KiB, not the A100's 163 KiB or sm89's 99 KiB); other head dims and the CPU never change."""
    from litespark_kernels.ops import _attention_triton as at

    monkeypatch.setattr(at, "interpreting", lambda: False)
    monkeypatch.setattr(at, "_shared_memory_per_block", lambda index: smem)
    cuda = torch.device("cuda", 0)
    for kind in ("fwd", "dq"):
        want = at.LARGE_SMEM_CONFIGS[(kind, 256)] if large else at.CONFIGS[(kind, 256)]
        assert at._config(kind, 256, 2048, cuda) == want
        assert at._config(kind, 64, 2048, cuda) == at.CONFIGS[(kind, 64)]
        assert at._config(kind, 256, 2048, torch.device("cpu")) == at.CONFIGS[(kind, 256)]
    assert at._config("dkv", 256, 2048, cuda) == at.CONFIGS[("dkv", 256)]
    assert at.LARGE_SMEM_CONFIGS[("fwd", 256)] != at.CONFIGS[("fwd", 256)]
