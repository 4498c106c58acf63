"""The launch shortcut on the GPU: every wrapped kernel's results are bit for bit those of Triton's own launch.

One workload touches every kernel that `litespark_kernels._launch.fast_launch` wraps, at odd shapes (1000 rows of
hidden 123, a 20000-wide row for the looped norms, sequence 1000 attention with segments, a vocabulary of 1001),
with tensors whose pointers are not 16-byte aligned next to aligned ones, forward and backward. It runs three
times from the same seed: through Triton's launch (``LITESPARK_FAST_LAUNCH=0``), then twice with the shortcut (the
first fills its cache, the second launches every kernel through it); all outputs and gradients must be equal.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu


def _workload(seed: int) -> list[torch.Tensor]:
    import litespark_kernels as lk
    from litespark_kernels.ops.fp8 import quantize
    from litespark_kernels.ops.optim import adamw_step

    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16

    def r(*shape, dtype=bf, offset=0):
        flat = torch.randn(offset + torch.Size(shape).numel(), generator=g, device="cuda", dtype=torch.float32)
        # a storage offset of one element leaves the pointer off 16-byte alignment
        return flat.to(dtype)[offset:].view(*shape).detach()

    out = []

    def grads(y, inputs):
        ys = y if isinstance(y, (tuple, list)) else (y,)
        dys = [torch.randn(t.shape, generator=g, device="cuda", dtype=torch.float32).to(t.dtype) for t in ys]
        out.extend(t.detach() for t in ys)
        out.extend(torch.autograd.grad(ys, inputs, dys))

    for rows, cols, off in ((1000, 123, 0), (1000, 123, 1), (7, 20000, 0)):
        x, res = r(rows, cols, offset=off).requires_grad_(), r(rows, cols).requires_grad_()
        w, b = r(cols).requires_grad_(), r(cols).requires_grad_()
        grads(lk.rms_norm(x, w), (x, w))
        grads(lk.add_rms_norm(x, res, w), (x, res, w))
        grads(lk.layer_norm(x, w, b), (x, w, b))

    gate, up = r(1000, 123, offset=1).requires_grad_(), r(1000, 123).requires_grad_()
    grads(lk.swiglu(gate, up), (gate, up))
    gate_up = r(1000, 2 * 123).requires_grad_()
    grads(lk.swiglu_packed(gate_up), (gate_up,))
    xb, bias = r(1000, 123).requires_grad_(), r(123).requires_grad_()
    grads(lk.gelu_tanh_bias(xb, bias), (xb, bias))

    B, S, Hq, Hkv, D = 2, 1000, 4, 2, 64
    q = r(B, S, Hq, D).transpose(1, 2).requires_grad_()
    k = r(B, S, Hkv, D).transpose(1, 2).requires_grad_()
    v = r(B, Hkv, S, D).requires_grad_()
    cos, sin = r(B, S, D), r(B, S, D)
    grads(lk.apply_rope(q, k, cos, sin), (q, k))
    grads(lk.attention(q, k, v, causal=True), (q, k, v))
    seg = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor([300, 450, 250], device="cuda"))
    seg = seg.expand(B, S).contiguous()
    grads(lk.attention(q, k, v, causal=True, q_segment_ids=seg, kv_segment_ids=seg), (q, k, v))

    hidden, weight = r(2 * 500, 123).requires_grad_(), r(1001, 123).requires_grad_()
    labels = torch.randint(0, 1001, (2, 500), generator=g, device="cuda")
    labels[:, :37] = -100
    loss = lk.fused_linear_cross_entropy(hidden.view(2, 500, 123), weight, labels)
    grads(loss * 0.5, (hidden, weight))  # a gradient of 0.5 * dy: the scale kernel

    params = [r(1000, 123, dtype=torch.float32), r(123, dtype=torch.float32)]
    gs = [r(*p.shape, dtype=torch.float32) for p in params]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    for step in (1, 2):
        adamw_step(params, gs, ms, vs, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=step)
    out += params + ms + vs

    t = r(1000, 123)
    out.extend(x for x in quantize(t, torch.float8_e4m3fn, pad_rows_to=16, transposed=True) if x is not None)
    return [o.float() if o.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else o for o in out]


def test_fast_launches_equal_tritons_bit_for_bit(monkeypatch):
    from litespark_kernels import _launch

    if not _launch.enabled():
        pytest.skip(f"the shortcut is off for triton {__import__('triton').__version__} (checked: "
                    f"{_launch.CHECKED_TRITON})")
    monkeypatch.setenv("LITESPARK_FAST_LAUNCH", "0")
    plain = _workload(0)
    monkeypatch.setenv("LITESPARK_FAST_LAUNCH", "1")
    first = _workload(0)
    before = {name: dict(launcher.stats) for name, launcher in _launch.launchers().items()}
    second = _workload(0)
    torch.cuda.synchronize()
    assert len(plain) == len(first) == len(second) > 60
    for i, (a, b, c) in enumerate(zip(plain, first, second)):
        assert torch.equal(a, b), f"output {i}: the shortcut's first pass differs from Triton's launch"
        assert torch.equal(a, c), f"output {i}: the shortcut's cached launches differ from Triton's launch"
    used = {}
    for name, launcher in _launch.launchers().items():
        fast = launcher.stats["fast"] - before[name]["fast"]
        compiled = launcher.stats["triton"] - before[name]["triton"]
        other = {k: v - before[name].get(k, 0) for k, v in launcher.stats.items() if k not in ("fast", "triton")}
        assert compiled == 0 and not any(other.values()), (name, compiled, other)
        used[name] = fast
    unused = sorted(n for n, f in used.items() if f == 0 and n.startswith("_") and n != "_kernel")
    assert not unused, f"kernels the workload never launched through the shortcut: {unused}"
