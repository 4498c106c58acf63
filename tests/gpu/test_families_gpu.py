"""The dense families of issue #16 on the GPU in bf16 (Triton kernels on), Litespark vs stock transformers, each tiny
config with its quirks on; and the Gemma (``offset``) mode of the Triton RMSNorm kernel in bf16 and fp16.

Families and quirks (windows of 64 tokens, shorter than the 256-token sequences and than every packed document):
- gemma2: (1 + w) norms drawn away from 0, sandwich norms, scaled tied embedding, query_pre_attn_scalar 48 != head_dim
  64, sliding / full layers, attention logit soft-cap 5 (the backend's PyTorch reference) and final-logit soft-cap 3
  (the stock loss); stock runs eager (transformers' choice for Gemma2);
- gemma3_text: as Gemma2 without soft-caps, (1 + w) q/k norms, RoPE per layer type; the fused loss with the tied
  scaled embedding;
- phi3: fused qkv_proj / gate_up_proj, partial rotary 0.5, window 64;
- smollm3: layer 1 without RoPE, sliding layers 1-2;
- olmo2 / olmo3: post-norms, whole-projection q/k norms; olmo3 sliding layers 0 and 2;
- granite: embedding 2.5, residual 0.4, attention 0.1 multipliers, logits / 3;
- ministral: sliding / full layers (head_dim 64).

Tolerances as tests/gpu/test_equivalence_gpu.py: both bf16 models are compared with an fp32 oracle (the stock model in
float32 on the same weights); Litespark's relative error <= 2x the stock bf16 model's + 2e-3, for the logits (real
tokens), the loss and every parameter gradient; 20 AdamW steps with |loss_litespark - loss_stock| <= 1e-2 + 5e-2 *
loss_stock. Two bf16 settings: bf16 weights (as that file), and fp32 weights under bf16 autocast (as the Trainer's
``bf16=True``). Batches: plain, right/left padded (the unpadded decoder on CUDA), packed position_ids.

The norm kernel (kernels/litespark_kernels/ops/_rms_norm_triton.py, ``HAS_OFFSET``): y = x_hat * (1 + w) in fp32,
one rounding; plain and with the fused residual add, forward and backward, 1000 rows of an odd hidden size (123),
the in-register and the looped paths, weights in the input dtype or fp32 (Gemma under autocast). Criterion as
tests/gpu/test_pointwise_gpu.py: relerr(kernel, oracle) <= 2 * relerr(reference in the low dtype, oracle) +
eps(dtype) / 20, the oracle being the reference on fp32-upcast inputs.
"""

import contextlib
import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import litespark_hf
from tiny_models import train_side_by_side

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]

DEVICE = "cuda"
SEQ, WINDOW, VOCAB = 256, 64, 128
COMMON = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              num_hidden_layers=2)
_GEMMA = dict(head_dim=64, query_pre_attn_scalar=48, sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh",
              layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True, rms_norm_eps=1e-6)
# family -> (config overrides with the quirks on, the stock attn_implementation)
FAMILIES = {
    "gemma2": (dict(_GEMMA, attn_logit_softcapping=5.0, final_logit_softcapping=3.0), "eager"),
    "gemma3_text": (dict(_GEMMA), "sdpa"),
    "phi3": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                  sliding_window=WINDOW, resid_pdrop=0.0, embd_pdrop=0.0), "sdpa"),
    "smollm3": (dict(num_hidden_layers=3, no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=WINDOW,
                     layer_types=["full_attention", "sliding_attention", "sliding_attention"]), "sdpa"),
    "olmo2": (dict(), "sdpa"),
    "olmo3": (dict(num_hidden_layers=3, sliding_window=WINDOW,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]), "sdpa"),
    "granite": (dict(embedding_multiplier=2.5, residual_multiplier=0.4, attention_multiplier=0.1,
                     logits_scaling=3.0), "sdpa"),
    "ministral": (dict(head_dim=64, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]),
                  "sdpa"),
}
MODES = ["bf16_weights", "autocast"]


def rel_err(a, b):
    a, b = a.float(), b.float()
    assert torch.isfinite(a).all(), "non-finite values"
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def models(family, mode):
    """(fp32 oracle, stock, Litespark) on the same weights; stock and Litespark in bf16 (weights, or autocast)."""
    overrides, stock_impl = FAMILIES[family]
    config = AutoConfig.for_model(family, **{**COMMON, **overrides})
    torch.manual_seed(0)
    oracle = AutoModelForCausalLM.from_config(config, attn_implementation=stock_impl).float()
    if family.startswith("gemma"):  # Gemma's norm weights start at 0 (a gain of 1 + 0): make the offset matter
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in oracle.named_parameters():
                if "norm" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
    oracle = oracle.to(DEVICE)
    stock = copy.deepcopy(oracle)
    if mode == "bf16_weights":
        stock = stock.to(torch.bfloat16)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    assert lit.config._attn_implementation == "litespark" and litespark_hf.swapped_counts(lit)
    return oracle, stock, lit


def contexts(mode):
    """The contexts the oracle, the stock and the Litespark model run in."""
    def amp():
        return torch.autocast(DEVICE, dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()

    return contextlib.nullcontext, amp, amp


def batch(kind):
    g = torch.Generator().manual_seed(0)
    if kind == "packed":
        lengths = [100, 60, 96]
        ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        labels = ids.clone()
        labels[0, torch.tensor([0] + lengths[:-1]).cumsum(0)] = -100
        return dict(input_ids=ids.to(DEVICE), position_ids=pos.to(DEVICE), labels=labels.to(DEVICE),
                    use_cache=False), None
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones_like(ids)
    if kind == "padded":
        mask[0, -37:] = 0  # right padding
        mask[1, :21] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    # nothing is "predicted" from a pad (left padding's first real token: litespark_hf.unpadding ignores it)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE),
                use_cache=False), mask.bool().to(DEVICE)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_logits_loss_and_gradients(family, kind, mode):
    oracle, stock, lit = models(family, mode)
    inputs, valid = batch(kind)
    no_labels = {k: v for k, v in inputs.items() if k != "labels"}
    outs = []
    for m, ctx in zip((oracle, stock, lit), contexts(mode)):
        m.eval()
        with torch.no_grad(), ctx():
            logits = m(**no_labels).logits
        outs.append(logits[valid] if valid is not None else logits)
    err_stock, err_lit = rel_err(outs[1], outs[0]), rel_err(outs[2], outs[0])
    assert err_lit <= 2 * err_stock + 2e-3, ("logits", err_lit, err_stock)

    losses, grads = [], []
    for m, ctx in zip((oracle, stock, lit), contexts(mode)):
        m.train()
        m.zero_grad()
        with ctx():
            loss = m(**inputs).loss
        loss.backward()
        losses.append(loss.detach().float())
        grads.append([p.grad for p in m.parameters()])
    e_stock, e_lit = rel_err(losses[1], losses[0]), rel_err(losses[2], losses[0])
    assert e_lit <= 2 * e_stock + 2e-3, ("loss", e_lit, e_stock)
    for (name, _), g0, g1, g2 in zip(oracle.named_parameters(), *grads):
        assert g0 is not None and g1 is not None and g2 is not None, name
        e1, e2 = rel_err(g1, g0), rel_err(g2, g0)
        assert e2 <= 2 * e1 + 2e-3, (name, e2, e1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bf16_twenty_steps(family):
    _, stock, lit = models(family, "bf16_weights")
    for step, (a, b) in enumerate(train_side_by_side((stock, lit), [batch("padded")[0]], lr=1e-3)):
        assert abs(a - b) <= 1e-2 + 5e-2 * a, (step, a, b)


# ------------------------------------------------------------------------------------------------ the offset norm
def _norm_check(name, fn_kernel, fn_ref, tensors, dtype, grad_idx):
    """Forward outputs and the gradients of ``tensors[grad_idx]``: kernel vs low-dtype reference vs fp32 oracle."""
    slack = torch.finfo(dtype).eps / 20

    def prep(cast):
        return [cast(t).detach().clone().requires_grad_(i in grad_idx) if isinstance(t, torch.Tensor) else t
                for i, t in enumerate(tensors)]

    ins_k, ins_r, ins_o = prep(lambda t: t), prep(lambda t: t), prep(lambda t: t.float())
    outs = []
    for fn, ins in ((fn_kernel, ins_k), (fn_ref, ins_r), (fn_ref, ins_o)):
        out = fn(*ins)
        outs.append(out if isinstance(out, tuple) else (out,))
    report = []
    for j, (k, r, o) in enumerate(zip(*outs)):
        assert k.shape == r.shape and k.dtype == r.dtype, (name, j, k.dtype, r.dtype)
        report.append((f"out{j}", rel_err(k, o), rel_err(r, o)))
    gen = torch.Generator(device=DEVICE).manual_seed(123)
    gouts = [torch.randn(o.shape, device=DEVICE, generator=gen) for o in outs[2]]
    grads = []
    for out, ins in zip(outs, (ins_k, ins_r, ins_o)):
        grads.append(torch.autograd.grad(out, [ins[i] for i in grad_idx], [g.to(o.dtype) for g, o in zip(gouts, out)]))
    for i, k, r, o in zip(grad_idx, *grads):
        assert k.dtype == r.dtype and k.shape == r.shape, (name, i)
        report.append((f"grad{i}", rel_err(k, o), rel_err(r, o)))
    print(f"\n{name} {dtype}: " + ", ".join(f"{n} kernel {ek:.2e} ref {er:.2e}" for n, ek, er in report))
    for n, ek, er in report:
        assert ek <= 2 * er + slack, f"{name} {n}: kernel {ek:.3e} vs reference {er:.3e}"


def _rnd(*shape, dtype, scale=1.0, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return (scale * torch.randn(*shape, device=DEVICE, generator=g)).to(dtype)


@pytest.fixture(params=["registers", "looped"])
def norm_path(request, monkeypatch):
    """The in-register kernels, or (small fused-block limit) the looped ones that stream a row in blocks."""
    from litespark_kernels.ops import _rms_norm_triton as rms_mod

    if request.param == "looped":
        monkeypatch.setattr(rms_mod, "MAX_FUSED_BLOCK", 32)
        monkeypatch.setattr(rms_mod, "LOOP_BLOCK", 32)
    return request.param


@pytest.mark.parametrize("weight_dtype", ["input", "float32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_offset_rms_norm_kernel(dtype, weight_dtype, norm_path):
    from litespark_kernels.ops import _rms_norm_triton as rms_mod
    from litespark_kernels.ops.rms_norm import add_rms_norm_reference, rms_norm_reference

    rows, hidden = 1000, 123
    x, r = _rnd(rows, hidden, dtype=dtype), _rnd(rows, hidden, dtype=dtype, seed=2)
    w = _rnd(hidden, dtype=dtype if weight_dtype == "input" else torch.float32, scale=0.3, seed=1)  # Gemma: ~0

    def kernel(x, w):
        return rms_mod.rms_norm_triton(x, w, 1e-6, offset=1.0)

    def reference(x, w):
        return rms_norm_reference(x, w, 1e-6, offset=1.0)

    def kernel_add(x, r, w):
        return rms_mod.add_rms_norm_triton(x, r, w, 1e-6, offset=1.0)

    def reference_add(x, r, w):
        return add_rms_norm_reference(x, r, w, 1e-6, 1.0)

    tag = f"offset rms_norm {rows}x{hidden} w={weight_dtype} {norm_path}"
    _norm_check(tag, kernel, reference, (x, w), dtype, grad_idx=(0, 1))
    _norm_check("add " + tag, kernel_add, reference_add, (x, r, w), dtype, grad_idx=(0, 1, 2))
    y = kernel(x, w)
    assert y.dtype == dtype  # Gemma's type_as(x)
