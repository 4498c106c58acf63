"""Float8 projections (`litespark_kernels.ops.fp8`, ``LitesparkConfig.fp8``) on the CPU.

ATen's CPU ``torch._scaled_mm`` runs the same float8 GEMMs the GPU path runs, so the whole Function is checked here:
- `quantize_reference` against its definition (scale, rounding bound, padding, transposed copy, zeros);
- the Triton quantize kernel in Triton's CPU interpreter, written to float32 buffers (the interpreter's float8 casts
  are not faithful), against the reference's scaled and clamped values, bit for bit, and the same inverse scale;
- `fused_linear(..., fp8=True)`: forward against the float32 oracle of the same quantization (`_emulated`),
  backward (dx, every weight's and bias's gradient) against a float32 emulation of the float8 backward, token counts
  that are not multiples of 16 (1000), biases on some projections, and loosely against the bf16 path;
- the fallbacks: a feature count that is not a multiple of 16 (123) and fp32 compute run the bf16 path with a
  warning, same values as without fp8;
- a tiny Llama with ``apply(fp8=True)``: the projection modules marked, a training step's loss and gradients close to
  the bf16 model's, float8 tensors saved for backward, `restore` unmarking.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import litespark_hf
import litespark_kernels as lk
from litespark_kernels.ops import fp8
from tiny_models import random_batch, rel_err, tiny_model

E4M3, E5M2 = fp8.E4M3, fp8.E5M2


def _deq(q, inv):
    return q.float() * inv


@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("shape,pad", [((1000, 123), 16), ((37, 64), 1), ((5, 3), 16)])
def test_quantize_reference_definition(dtype, shape, pad):
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(*shape, generator=g) * 7).to(torch.bfloat16)
    q, qt, inv = fp8.quantize_reference(t, dtype, pad, transposed=True)
    fmax = torch.finfo(dtype).max
    rows = -(-shape[0] // pad) * pad
    assert q.dtype == dtype and q.shape == (rows, shape[1]) and qt.shape == (shape[1], rows)
    assert torch.equal(qt.float(), q.t().float())
    assert torch.equal(q[shape[0]:].float(), torch.zeros(rows - shape[0], shape[1]))
    amax = t.float().abs().max()
    assert inv.shape == (1,) and inv.dtype == torch.float32
    assert abs(inv.item() * fmax - amax.item()) <= 1e-6 * amax.item()
    assert q.float().abs().max().item() == fmax  # the largest element lands on the format's maximum
    # round to nearest: each element within half a float8 step (3 or 2 mantissa bits) of t, relative, above the
    # normal range's floor
    mant = 3 if dtype == E4M3 else 2
    err = (_deq(q[: shape[0]], inv) - t.float()).abs()
    bound = t.float().abs() * 2.0 ** -(mant + 1) + inv * torch.finfo(dtype).smallest_normal
    assert (err <= bound * (1 + 1e-6)).all()


def test_quantize_zeros_and_no_transposed_copy():
    q, qt, inv = fp8.quantize_reference(torch.zeros(20, 32, dtype=torch.bfloat16), E4M3, 16)
    assert qt is None and q.shape == (32, 32)
    assert torch.equal(q.float(), torch.zeros(32, 32)) and torch.isfinite(inv).all()
    with pytest.raises(ValueError, match="2-D"):
        fp8.quantize_reference(torch.zeros(2, 3, 4), E4M3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
@pytest.mark.parametrize("shape,pad,transposed", [((1000, 123), 16, True), ((37, 64), 1, True),
                                                  ((64, 200), 16, False)])
def test_triton_quantize_in_interpreter(dtype, shape, pad, transposed):
    from litespark_kernels.ops import _fp8_triton

    g = torch.Generator().manual_seed(1)
    t = (torch.randn(*shape, generator=g) * 3).to(torch.bfloat16)
    q, qt, inv = _fp8_triton.quantize_triton(t, dtype, pad, transposed, buffer_dtype=torch.float32)
    _, _, inv_ref = fp8.quantize_reference(t, dtype, pad)
    assert inv.item() == inv_ref.item()
    fmax = torch.finfo(dtype).max
    rows = fp8.padded(shape[0], pad)
    scale = fp8.scale_of(t.float().abs().max(), dtype)
    expect = (F.pad(t, (0, 0, 0, rows - shape[0])).float() * scale).clamp(-fmax, fmax)
    assert torch.equal(q, expect)
    assert (qt is None) == (not transposed)
    if transposed:
        assert torch.equal(qt, expect.t())


def _group(shapes, k, bias_mask, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(n, k, generator=g) / k ** 0.5).requires_grad_(True) for n in shapes]
    bs = [(torch.randn(n, generator=g).requires_grad_(True) if m else None) for n, m in zip(shapes, bias_mask)]
    return ws, bs


def _emulated(x, ws, bs, gy):
    """The float8 Function's forward and backward in float32 from the same quantized operands."""
    x2 = x.detach().reshape(-1, x.shape[-1]).bfloat16()
    w = torch.cat([w.detach() for w in ws]).bfloat16()
    xq, _, xi = fp8.quantize_reference(x2, E4M3, 16)
    wq, _, wi = fp8.quantize_reference(w, E4M3)
    y = _deq(xq, xi)[: x2.shape[0]] @ _deq(wq, wi).t()
    if any(b is not None for b in bs):
        y = y + torch.cat([b.detach() if b is not None else torch.zeros(w_.shape[0]) for b, w_ in zip(bs, ws)])
    dy2 = gy.reshape(-1, gy.shape[-1]).bfloat16()
    dq, _, di = fp8.quantize_reference(dy2, E5M2, 16)
    dx = _deq(dq, di) @ _deq(wq, wi)
    dw = _deq(dq, di).t() @ _deq(xq, xi)
    return y, dx[: x2.shape[0]], dw, dy2.float().sum(0)


@pytest.mark.parametrize("shapes,bias_mask", [([64, 16, 16], [0, 0, 0]), ([48, 32], [1, 0]), ([128], [1])])
def test_fused_linear_fp8_matches_float8_emulation(shapes, bias_mask):
    k = 64
    ws, bs = _group(shapes, k, bias_mask)
    x = (torch.randn(4, 250, k) * 2).requires_grad_(True)  # 1000 tokens: padded to 1008 inside
    gy = torch.randn(4, 250, sum(shapes))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lk.fused_linear(x, ws, bs, fp8=True)
        y_bf16 = lk.fused_linear(x, ws, bs)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 250, sum(shapes))
    leaves = [x, *ws, *[b for b in bs if b is not None]]
    grads = torch.autograd.grad(y, leaves, gy)
    y_e, dx_e, dw_e, db_e = _emulated(x, ws, bs, gy)
    # forward: the same float8 operands; only the bf16 output rounding and the summation order differ
    assert rel_err(y.float().reshape(-1, y.shape[-1]), y_e) <= 4e-3
    assert grads[0].dtype == torch.float32 and rel_err(grads[0].reshape(dx_e.shape), dx_e) <= 1e-5
    r = 0
    for w, g in zip(ws, grads[1:1 + len(ws)]):
        assert g.dtype == torch.float32 and rel_err(g, dw_e[r:r + w.shape[0]]) <= 1e-5
        r += w.shape[0]
    db = [g for g in grads[1 + len(ws):]]
    offsets = [sum(shapes[:i]) for i in range(len(shapes))]
    for (b, off, n), g in zip([(b, o, n) for b, o, n in zip(bs, offsets, shapes) if b is not None], db):
        assert rel_err(g, db_e[off:off + n]) <= 1e-5
    # and it is a float8 product: a few percent from bf16 (e4m3: 3 mantissa bits), not equal to it
    err = rel_err(y.float(), y_bf16.float())
    assert 1e-3 < err < 0.08, err


def test_fused_linear_fp8_frozen_weights():
    """Frozen weights (a LoRA base): only dx is computed; it equals the emulation's, and no weight gradient exists."""
    ws, bs = _group([64, 32], 64, [0, 0])
    for w in ws:
        w.requires_grad_(False)
    x = torch.randn(2, 99, 64).requires_grad_(True)
    gy = torch.randn(2, 99, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lk.fused_linear(x, ws, bs, fp8=True)
    (dx,) = torch.autograd.grad(y, [x], gy)
    y_e, dx_e, _, _ = _emulated(x, ws, bs, gy)
    assert rel_err(y.float().reshape(-1, 96), y_e) <= 4e-3
    assert rel_err(dx.reshape(dx_e.shape), dx_e) <= 1e-5
    assert all(w.grad is None for w in ws)


def test_fp8_fallbacks_warn_and_match_the_bf16_path():
    ws, bs = _group([40], 123, [1])
    x = torch.randn(3, 50, 123)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="float8 projections: a projection of 123 -> 40"):
            y = lk.fused_linear(x, ws, bs, fp8=True)
        assert torch.equal(y, lk.fused_linear(x, ws, bs))
    ws, bs = _group([32], 64, [0])
    x = torch.randn(7, 64)
    with pytest.warns(UserWarning, match="compute dtype is torch.float32"):
        y = lk.fused_linear(x, ws, bs, fp8=True)
    assert torch.equal(y, lk.fused_linear(x, ws, bs))


SIZE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2)


def _saved_dtypes(model, batch):
    dtypes = []

    def pack(t):
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**batch).loss.backward()
    return dtypes


def test_tiny_llama_fp8_trains_close_to_bf16_and_restores():
    bf16 = tiny_model("llama", **SIZE)
    litespark_hf.apply(bf16)
    f8 = copy.deepcopy(bf16)
    litespark_hf.restore(f8)
    litespark_hf.apply(f8, fp8=True)
    marked = [n for n, m in f8.named_modules() if m.__dict__.get("_litespark_fp8")]
    assert len(marked) == 2 * SIZE["num_hidden_layers"]  # each layer's attention and MLP
    assert not any(m.__dict__.get("_litespark_fp8") for m in bf16.modules())
    ids = random_batch(2, 40)
    mask = torch.ones_like(ids)
    mask[1, 29:] = 0  # padding: the unpadded decoder's token count (69) is not a multiple of 16
    batch = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    losses, grads = [], []
    for model in (bf16, f8):
        model.train()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert abs(losses[0] - losses[1]) <= 5e-3 * losses[0]  # measured 1e-4 relative
    for name, g in grads[0].items():
        assert torch.isfinite(grads[1][name]).all(), name
        assert rel_err(grads[1][name], g) <= 0.25, name  # e5m2 gradients: measured 3-13% (2 mantissa bits)
    proj = [n for n in grads[0] if "proj" in n and n.endswith("weight")]
    assert any(rel_err(grads[1][n], grads[0][n]) > 1e-3 for n in proj)  # float8 really ran
    saved = _saved_dtypes(f8, batch)
    assert saved.count(E4M3) >= 4 * 2 * SIZE["num_hidden_layers"]  # x and w of 4 projection groups per layer
    assert E4M3 not in _saved_dtypes(bf16, batch)
    litespark_hf.apply(f8, fp8=False)  # applying again with another config takes the new one
    assert not any(m.__dict__.get("_litespark_fp8") for m in f8.modules())
    litespark_hf.apply(f8, fp8=True)
    litespark_hf.restore(f8)
    assert not any(m.__dict__.get("_litespark_fp8") for m in f8.modules())


def test_fp8_config_flag_and_model_without_fused_projections():
    assert litespark_hf.LitesparkConfig.from_any({"fp8": True}).fp8
    assert not litespark_hf.LitesparkConfig().fp8
    model = tiny_model("llama", **SIZE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        litespark_hf.apply(model, fp8=True, mlp=False, rope=False, fused_cross_entropy=False)
    assert any("no projection of this model runs through" in str(w.message) for w in caught)
