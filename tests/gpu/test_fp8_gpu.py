"""GPU checks of the float8 projections (``LitesparkConfig.fp8``; run with ``pytest -m gpu``).

- The Triton quantize kernels against `quantize_reference` bit for bit (the scale, every float8 value, the transposed
  copy, the zero padding rows), e4m3 and e5m2, bf16 and fp32 inputs, odd shapes (1000 x 123, 8192 x 2048).
- `fused_linear(..., fp8=True)` under bf16 autocast against a float32 emulation of the same quantized operands
  (forward, dx, dw, db), 1000 tokens (padded to 1008 inside), with biases; and loosely against the bf16 path.
  Tolerances: the forward within 1e-2 of the emulation (bf16 output rounding, Hopper's fast float8 accumulation,
  which the forward GEMM uses), dx and dw within 1e-3 (fp32 outputs, precise accumulation).
- A Llama-shaped model (hidden 1024, 4 layers, vocabulary 8192) with ``apply(fp8=True)``: 30 AdamW steps from the
  same initialisation on the same 4 batches (cycled) track the bf16 run's losses (each within 5%, the mean within
  0.5%, the last 8 steps' mean within 1%), and fall. Each step was 2% at first, a guess: on the H200 the first 12
  steps were within 2.3% and the last ones within 3.7%, the fp8 run above and below the bf16 one in turn (the curve
  jumps by 0.5 from one memorised batch to the next), so per step the curves drift apart while their means agree.
"""

import copy

import pytest
import torch

import litespark_hf
import litespark_kernels as lk
from litespark_kernels.ops import fp8
from litespark_kernels.ops._fp8_triton import quantize_triton

pytestmark = pytest.mark.gpu

needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="float8 GEMMs need compute capability 8.9+")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [fp8.E4M3, fp8.E5M2])
@pytest.mark.parametrize("src", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,pad,transposed", [((1000, 123), 16, True), ((8192, 2048), 16, True),
                                                  ((3072, 2048), 1, True), ((17, 64), 16, False)])
def test_quantize_kernel_matches_reference_bitwise(dtype, src, shape, pad, transposed):
    g = torch.Generator(device="cuda").manual_seed(0)
    t = (torch.randn(*shape, generator=g, device="cuda") * 5).to(src)
    q, qt, inv = quantize_triton(t, dtype, pad, transposed)
    rq, rqt, rinv = fp8.quantize_reference(t, dtype, pad, transposed)
    assert inv.item() == rinv.item()
    assert q.shape == rq.shape and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    if transposed:
        assert torch.equal(qt.view(torch.uint8), rqt.view(torch.uint8))
    else:
        assert qt is None


def _emulated(x2, w, b, dy2):
    xq, _, xi = fp8.quantize_reference(x2, fp8.E4M3, 16)
    wq, _, wi = fp8.quantize_reference(w, fp8.E4M3)
    dq, _, di = fp8.quantize_reference(dy2, fp8.E5M2, 16)
    m = x2.shape[0]
    xd, wd, dd = xq.float() * xi, wq.float() * wi, dq.float() * di
    y = (xd @ wd.t())[:m] + (b.float() if b is not None else 0)
    return y, (dd @ wd)[:m], dd.t() @ xd, dy2.float().sum(0)


@needs_fp8
@pytest.mark.parametrize("n_out,k,bias", [(3072, 2048, False), (16384, 2048, False), (2048, 8192, False),
                                          (400, 128, True)])
def test_fused_linear_fp8_matches_emulation(n_out, k, bias):
    torch.backends.cuda.matmul.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1000, k, generator=g, device="cuda").requires_grad_(True)
    w = (torch.randn(n_out, k, generator=g, device="cuda") / k ** 0.5).requires_grad_(True)
    b = torch.randn(n_out, generator=g, device="cuda").requires_grad_(True) if bias else None
    dy = torch.randn(1000, n_out, generator=g, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = lk.fused_linear(x, [w], [b], fp8=True)
        y16 = lk.fused_linear(x, [w], [b])
    leaves = [x, w] + ([b] if bias else [])
    grads = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    y_e, dx_e, dw_e, db_e = _emulated(x.detach().bfloat16(), w.detach().bfloat16(),
                                      b.detach().bfloat16() if bias else None, dy.bfloat16())
    assert _rel(y.float(), y_e) < 1e-2
    assert _rel(grads[0], dx_e) < 1e-3 and grads[0].dtype == torch.float32
    assert _rel(grads[1], dw_e) < 1e-3 and grads[1].dtype == torch.float32
    if bias:
        assert _rel(grads[2], db_e) < 1e-3
    assert 1e-3 < _rel(y.float(), y16.float()) < 0.08


@needs_fp8
def test_llama_fp8_training_tracks_bf16():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                               num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=4,
                               max_position_embeddings=1024, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()
    runs = []
    for use_fp8 in (False, True):
        model = copy.deepcopy(base)
        litespark_hf.apply(model, fp8=use_fp8)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True)
        g = torch.Generator(device="cuda").manual_seed(5)
        pool = [torch.randint(0, 8192, (4, 512), generator=g, device="cuda") for _ in range(4)]
        losses = []
        for step in range(30):  # 4 batches cycled: learnable (memorised), so the curves have a slope to track
            ids = pool[step % 4]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs.append(losses)
    bf16, f8 = torch.tensor(runs[0]), torch.tensor(runs[1])
    assert ((f8 - bf16).abs() / bf16).max() < 0.05, (runs[0], runs[1])
    assert abs(f8.mean() - bf16.mean()) / bf16.mean() < 5e-3
    assert abs(f8[-8:].mean() - bf16[-8:].mean()) / bf16[-8:].mean() < 1e-2
    assert f8[-4:].mean() < f8[:4].mean() - 0.1  # it learns
