"""Triton attention on the GPU at real sizes, bf16 and fp16, forward and backward.

Tolerance (FlashAttention's test convention): for the output and each gradient,
    max|kernel - oracle| <= 2 * max|lowp_reference - oracle| + atol,
where the oracle is ``attention_reference`` on fp32 copies of the inputs (fp32 matrix products, no TF32), the
low-precision reference is the same math run in the input dtype (scores, probabilities and products rounded to
bf16/fp16, as eager PyTorch attention does), and atol is the dtype's rounding step at the oracle's largest
magnitude (eps * max|oracle|), a slack for tensors whose reference error is near zero. Every output must be finite;
queries with no visible key output exactly 0. Soft-capped cases (Gemma-2's ``softcap``): the low-precision reference
applies ``cap * tanh(s / cap)`` in the input dtype too, as transformers' eager Gemma-2 attention does.
"""

import pytest
import torch

from litespark_kernels.ops.attention import (
    SUPPORTED_HEAD_DIMS,
    attention,
    attention_reference,
    segment_ids_from_cu_seqlens,
    visibility_mask,
)

pytestmark = pytest.mark.gpu

if torch.cuda.is_available():
    from litespark_kernels.ops._attention_triton import attention_triton


def _lowp_reference(q, k, v, *, scale, causal, q_segment_ids=None, kv_segment_ids=None, sliding_window=None,
                    softcap=None):
    """Attention computed in q's dtype (eager-style): the error budget that the kernel is compared against."""
    B, Hq, Sq, D = q.shape
    G = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    scores = torch.matmul(q, kk.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    allowed = visibility_mask(
        Sq, k.shape[2], causal=causal, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        sliding_window=sliding_window, device=q.device,
    )
    has_key = allowed.any(-1, keepdim=True)
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~has_key, 0.0)
    probs = (torch.softmax(scores, dim=-1) * has_key).to(q.dtype)
    return torch.matmul(probs, vv).transpose(1, 2)


def _run(fn, q, k, v, do, **kw):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), do)
    return [out.detach(), *grads]


def _check(B, Hq, Hkv, Sq, Skv, D, dtype, *, seg=None, hf_layout=True, fn=None, **kw):
    torch.manual_seed(B * 1000 + Sq + D)
    dev = "cuda"
    if hf_layout:  # q/k/v as transformers hands them: [B, H, S, D] transposes of [B, S, H, D]
        q = torch.randn(B, Sq, Hq, D, device=dev, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Skv, Hkv, D, device=dev, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, Skv, Hkv, D, device=dev, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, Sq, D, device=dev, dtype=dtype)
        k = torch.randn(B, Hkv, Skv, D, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, Skv, D, device=dev, dtype=dtype)
    do = torch.randn(B, Sq, Hq, D, device=dev, dtype=dtype)
    if seg is not None:
        kw.update(q_segment_ids=seg[0], kv_segment_ids=seg[1])
    kw.setdefault("scale", D**-0.5)

    got = _run(fn or attention_triton, q, k, v, do, **kw)
    lowp = _run(_lowp_reference, q, k, v, do, **kw)
    oracle = _run(attention_reference, q.float(), k.float(), v.float(), do.float(), **kw)
    report = []
    for name, x, lp, ref in zip(("out", "dq", "dk", "dv"), got, lowp, oracle):
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        err = (x.float() - ref).abs().max().item()
        budget = (lp.float() - ref).abs().max().item()
        atol = torch.finfo(dtype).eps * ref.abs().max().item()
        report.append(f"{name}: err {err:.3e} vs lowp {budget:.3e} (atol {atol:.1e})")
        assert err <= 2 * budget + atol, "; ".join(report)
    print(" | ".join(report))
    return got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_causal_gqa_real_size(dtype, D):
    _check(2, 32, 8, 2048, 2048, D, dtype, causal=True)


def test_noncausal_contiguous_bf16():
    _check(1, 16, 4, 1536, 1536, 128, torch.bfloat16, causal=False, hf_layout=False)


@pytest.mark.parametrize("D", [80, 96])
def test_odd_head_dims_left_padding(D):
    B, S = 2, 1000
    lengths = torch.tensor([1000, 613], device="cuda")
    pos = torch.arange(S, device="cuda")[None]
    seg = torch.where(pos >= (S - lengths)[:, None], 0, -1).to(torch.int32)
    out, *_ = _check(B, 8, 2, S, S, D, torch.bfloat16, seg=(seg, seg), causal=True)
    assert (out[seg < 0] == 0).all()


def _packed_rows(docs, S):
    """int32 [len(docs), S] on the GPU: each row's documents (lengths) packed, then padding (-1)."""
    return torch.cat([segment_ids_from_cu_seqlens(torch.tensor([0, *lens]).cumsum(0), S) for lens in docs]).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128, 256])
def test_packed_padding_window(dtype, D):
    # Row 0: three documents; row 1: two documents then right padding; plus a 512-token sliding window.
    S = 2048
    seg = _packed_rows([[700, 900, 448], [1000, 600]], S)
    out, *_ = _check(2, 32, 8, S, S, D, dtype, seg=(seg, seg), causal=True, sliding_window=512)
    assert (out[seg < 0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("window", [None, 512])
def test_segment_full_blocks_packed(monkeypatch, dtype, D, window):
    # The experimental LITESPARK_ATTN_SEGMENT_FULL path: documents long enough for interior blocks (no segment mask
    # there), documents shorter than a block, padding; equal to the default path to the kernel's tolerance.
    from litespark_kernels.ops import _attention_triton as at

    S = 2048
    seg = _packed_rows([[900, 37, 611, 500], [1200, 100, 3]], S)
    monkeypatch.setattr(at, "SEGMENT_FULL_BLOCKS", True)
    out, *_ = _check(2, 16, 4, S, S, D, dtype, seg=(seg, seg), causal=True, sliding_window=window)
    assert (out[seg < 0] == 0).all()


def test_kv_longer_than_q_bf16():
    _check(2, 16, 4, 777, 2048, 128, torch.bfloat16, causal=True)


def test_dispatcher_uses_kernel_on_cuda():
    q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = attention(q, k, v, causal=True)
    ref = attention_triton(q, k, v, causal=True)
    assert torch.equal(out, ref)


def _cudnn_dispatch(q, k, v, **kw):
    return attention(q, k, v, cudnn=True, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_cudnn_plain_causal(dtype, D):
    """``cudnn=True`` (LitesparkConfig.attention_cudnn): plain causal GQA calls run torch's cuDNN SDPA, within the
    same error budget as the kernel; padded / windowed calls stay on the kernel, bit for bit."""
    from litespark_kernels.ops.attention import attention_cudnn

    _check(2, 32, 8, 2048, 2048, D, dtype, causal=True, fn=_cudnn_dispatch)
    q = torch.randn(1, 2048, 8, D, device="cuda", dtype=dtype).transpose(1, 2)
    k = torch.randn(1, 2048, 2, D, device="cuda", dtype=dtype).transpose(1, 2)
    v = torch.randn_like(k)
    assert torch.equal(attention(q, k, v, causal=True, cudnn=True), attention_cudnn(q, k, v))
    seg = torch.zeros(1, 2048, dtype=torch.int32, device="cuda")
    seg[:, 1500:] = -1
    assert torch.equal(attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg, cudnn=True),
                       attention_triton(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg))
    assert torch.equal(attention(q, k, v, causal=True, sliding_window=512, cudnn=True),
                       attention_triton(q, k, v, causal=True, sliding_window=512))


# Soft-capping (Gemma-2). Scores of std 4 (scale 4 / sqrt(D)) against a cap of 5, so that the cap bites on most of
# them; the cap of Gemma-2 itself (50) on ordinary scores in the last case.
SOFTCAP_HEAD_DIMS = [d for d in (64, 128, 256) if d in SUPPORTED_HEAD_DIMS]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", SOFTCAP_HEAD_DIMS)
def test_softcap_causal_gqa(dtype, D):
    _check(2, 8, 2, 1000, 1000, D, dtype, causal=True, softcap=5.0, scale=4 * D**-0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softcap_noncausal_contiguous(dtype):
    _check(1, 8, 4, 1000, 1000, 64, dtype, causal=False, hf_layout=False, softcap=5.0, scale=0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", SOFTCAP_HEAD_DIMS)
def test_softcap_packed_padding_window(dtype, D):
    # Row 0: left padding, then two documents; row 1: three documents then right padding; a 256-token window.
    S = 1000
    rows = [[-1] * 37 + [0] * 500 + [1] * 463, [0] * 300 + [1] * 400 + [2] * 201 + [-1] * 99]
    seg = torch.tensor(rows, dtype=torch.int32, device="cuda")
    out, *_ = _check(2, 8, 2, S, S, D, dtype, seg=(seg, seg), causal=True, sliding_window=256, softcap=5.0,
                     scale=4 * D**-0.5)
    assert (out[seg < 0] == 0).all()


def test_softcap_gemma2_cap_kv_longer_than_q():
    _check(1, 8, 4, 333, 1000, 128, torch.bfloat16, causal=True, softcap=50.0, scale=256**-0.5)


def test_softcap_dispatcher_uses_kernel_on_cuda():
    q = torch.randn(1, 8, 256, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 2, 256, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = attention(q, k, v, causal=True, softcap=5.0)
    assert torch.equal(out, attention_triton(q, k, v, causal=True, softcap=5.0))
    assert not torch.equal(out, attention_triton(q, k, v, causal=True))


def test_softcap_head_dim_the_kernel_does_not_take_runs_the_reference():
    # A head dim outside SUPPORTED_HEAD_DIMS (48): the dispatcher runs attention_reference with the soft-cap (never
    # SDPA, which has none).
    assert 48 not in SUPPORTED_HEAD_DIMS
    q = torch.randn(1, 8, 300, 48, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 300, 48, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = attention(q, k, v, causal=True, softcap=5.0, scale=0.25)
    assert torch.equal(out, attention_reference(q, k, v, causal=True, softcap=5.0, scale=0.25))


# Head-dim-256 launch configurations: the large-shared-memory ones (LARGE_SMEM_CONFIGS, what Hopper takes) and the
# others, each checked on this device where it can run them.
@pytest.mark.parametrize("large", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_dim_256_configs(monkeypatch, dtype, large):
    from litespark_kernels.ops import _attention_triton as at

    device = torch.device("cuda")
    fits = at._shared_memory_per_block(torch.cuda.current_device()) >= at.LARGE_SMEM_BYTES
    if large and not fits:
        pytest.skip("the large-shared-memory configurations need a device with >= 200 KiB per block")
    if not large:
        monkeypatch.setattr(at, "LARGE_SMEM_CONFIGS", {})
    expected = at.LARGE_SMEM_CONFIGS if large else at.CONFIGS
    assert at._config("fwd", 256, 2048, device) == expected[("fwd", 256)]
    assert at._config("dq", 256, 2048, device) == expected[("dq", 256)]
    _check(2, 8, 4, 2048, 2048, 256, dtype, causal=True)
    S = 1000
    lengths = torch.tensor([1000, 613], device="cuda")
    pos = torch.arange(S, device="cuda")[None]
    seg = torch.where(pos >= (S - lengths)[:, None], 0, -1).to(torch.int32)
    out, *_ = _check(2, 8, 4, S, S, 256, dtype, seg=(seg, seg), causal=True, sliding_window=256, softcap=50.0)
    assert (out[seg < 0] == 0).all()
