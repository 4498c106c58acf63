"""`litespark_kernels.ops.lora_linear`: frozen projections + LoRA adapters as one autograd node, against the
PEFT-style composition (`lora_linear_reference`), forward and backward, on random inputs and odd shapes."""

from __future__ import annotations

import pytest
import torch

from litespark_kernels.ops.lora_linear import lora_linear, lora_linear_reference


def _case(m, k, sizes, ranks, slots, bias, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, grad=False):
        t = torch.randn(*shape, generator=g, dtype=dtype) / shape[-1] ** 0.5
        return t.requires_grad_(grad)

    x = rnd(m, k, grad=True)
    weights = [rnd(n, k) for n in sizes]
    biases = [rnd(n) if b else None for n, b in zip(sizes, bias)]
    a_ws = [rnd(r, k, grad=True) for r in ranks]
    b_ws = [rnd(sizes[s], r, grad=True) for s, r in zip(slots, ranks)]
    scalings = [2.0 + j for j in range(len(ranks))]
    return x, weights, biases, a_ws, b_ws, scalings


CASES = [  # (tokens, in, projection sizes, adapter ranks, adapter slots, biases)
    (37, 64, [64, 16, 16], [4, 4, 4], [0, 1, 2], [False] * 3),  # q/k/v, every one adapted
    (1000, 123, [123, 40, 40], [8, 2], [0, 2], [True, False, True]),  # k without an adapter, odd sizes, biases
    (5, 48, [96, 96], [16, 16], [0, 1], [False, False]),  # gate/up
    (1, 33, [17], [3], [0], [True]),  # one projection, one token
]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_forward_and_backward(case):
    m, k, sizes, ranks, slots, bias = case
    x, weights, biases, a_ws, b_ws, scal = _case(m, k, sizes, ranks, slots, bias)
    x_r, a_r, b_r = (x.detach().clone().requires_grad_(),
                     [a.detach().clone().requires_grad_() for a in a_ws],
                     [b.detach().clone().requires_grad_() for b in b_ws])
    y = lora_linear(x.unsqueeze(0), weights, biases, a_ws, b_ws, scal, slots)
    y_r = lora_linear_reference(x_r.unsqueeze(0), weights, biases, a_r, b_r, scal, slots)
    assert y.shape == (1, m, sum(sizes))
    torch.testing.assert_close(y, y_r, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_r * dy).sum().backward()
    torch.testing.assert_close(x.grad, x_r.grad, rtol=1e-10, atol=1e-10)
    for got, want in zip([*a_ws, *b_ws], [*a_r, *b_r]):
        assert got.grad is not None and got.grad.shape == got.shape
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-10)
    assert all(w.grad is None for w in weights)


def test_fp32_and_only_adapters_trainable():
    m, k, sizes, ranks, slots, bias = CASES[1]
    x, weights, biases, a_ws, b_ws, scal = _case(m, k, sizes, ranks, slots, bias, seed=3, dtype=torch.float32)
    x.requires_grad_(False)  # the first layer's input: only the adapters want gradients
    y = lora_linear(x, weights, biases, a_ws, b_ws, scal, slots)
    torch.testing.assert_close(y, lora_linear_reference(x, weights, biases, a_ws, b_ws, scal, slots),
                               rtol=1e-5, atol=1e-5)
    y.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in (*a_ws, *b_ws))
    assert x.grad is None


def test_bad_inputs_are_one_line_errors():
    x, weights, biases, a_ws, b_ws, scal = _case(*CASES[0])
    slots = CASES[0][4]
    with pytest.raises(ValueError, match="frozen"):
        lora_linear(x, [weights[0].requires_grad_()], None, a_ws[:1], b_ws[:1], scal[:1], [0])
    weights[0].requires_grad_(False)
    with pytest.raises(ValueError, match="does not fit"):
        lora_linear(x, weights, biases, a_ws[:1], [b_ws[1]], scal[:1], [0])
    with pytest.raises(ValueError, match="one B, scaling and slot"):
        lora_linear(x, weights, biases, a_ws, b_ws[:1], scal, slots)
