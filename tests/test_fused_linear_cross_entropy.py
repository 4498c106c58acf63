"""CPU tests of the chunked fused linear cross-entropy (Triton interpreter, fp32 and a little fp16).

The Triton path is called directly (conftest sets TRITON_INTERPRET=1 without CUDA); the oracle is
``fused_linear_cross_entropy_reference`` (transformers' ForCausalLMLoss on full logits) through autograd.
"""

import pytest
import torch

from litespark_kernels.ops._fused_linear_cross_entropy_triton import _chunk_rows, fused_linear_cross_entropy_triton
from litespark_kernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_reference

# Small chunks and vocabulary blocks so that every test crosses chunk and block boundaries.
OPTS = {"chunk_rows": 96, "block_v": 256}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(lead, hidden_size, vocab, dtype=torch.float32, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*lead, hidden_size, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(dtype)
    b = (torch.randn(vocab, generator=g) * 0.1).to(dtype) if bias else None
    labels = torch.randint(0, vocab, lead, generator=g)
    return h, w, b, labels


def _run(fn, h, w, b, grad_scale=1.0, **kw):
    h = h.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    b = b.clone().requires_grad_(True) if b is not None else None
    loss = fn(h, w, bias=b, **kw)
    (loss * grad_scale).backward()
    return loss.detach(), h.grad, w.grad, (b.grad if b is not None else None)


def _triton(*args, **kw):
    return fused_linear_cross_entropy_triton(*args, _options=OPTS, **kw)


def _check(got, want, tol):
    names = ["loss", "grad_hidden", "grad_weight", "grad_bias"]
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), name
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = _rel(a, b)
        assert err < tol, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("bias", [False, True])
def test_batch_with_ignored_and_padding(bias):
    # hidden 123, vocab 1000, 1000 tokens as 2 x 500, random -100 labels plus right padding in sequence 1.
    h, w, b, labels = _inputs((2, 500), 123, 1000, bias=bias, seed=1)
    g = torch.Generator().manual_seed(2)
    labels[torch.rand(labels.shape, generator=g) < 0.3] = -100
    labels[1, 380:] = -100
    want = _run(fused_linear_cross_entropy_reference, h, w, b, labels=labels)
    got = _run(_triton, h, w, b, labels=labels)
    _check(got, want, 2e-5)
    assert got[1][1, 379:].abs().max() == 0  # padded positions (and the one before: its shifted label is padding)


def test_all_rows_valid_2d_hidden_shift_labels():
    h, w, b, labels = _inputs((300,), 57, 333, seed=3)  # [N, H] hidden; every shift label valid: no gather path
    want = _run(fused_linear_cross_entropy_reference, h, w, b, shift_labels=labels)
    got = _run(_triton, h, w, b, shift_labels=labels)
    _check(got, want, 2e-5)


def test_shift_labels_matches_labels_path():
    h, w, b, labels = _inputs((2, 150), 40, 270, seed=4)
    labels[0, :20] = -100
    shift = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    got_labels = _run(_triton, h, w, b, labels=labels)
    got_shift = _run(_triton, h, w, b, shift_labels=shift)
    want = _run(fused_linear_cross_entropy_reference, h, w, b, shift_labels=shift)
    _check(got_shift, want, 2e-5)
    _check(got_labels, got_shift, 1e-6)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_gradient_accumulation_num_items(as_tensor):
    # Two micro-batches, each normalised by the total number of items, sum to the full-batch mean (loss and grads).
    h, w, b, labels = _inputs((4, 90), 48, 301, bias=True, seed=5)
    labels[torch.rand(labels.shape, generator=torch.Generator().manual_seed(6)) < 0.4] = -100
    total = int((shifted := torch.cat([labels[:, 1:], torch.full((4, 1), -100)], 1)).ne(-100).sum())
    num_items = torch.tensor(total) if as_tensor else total
    full = _run(fused_linear_cross_entropy_reference, h, w, b, labels=labels)
    parts = []
    for sl in (slice(0, 2), slice(2, 4)):
        want = _run(fused_linear_cross_entropy_reference, h[sl], w, b, labels=labels[sl], num_items_in_batch=num_items)
        got = _run(_triton, h[sl], w, b, labels=labels[sl], num_items_in_batch=num_items)
        _check(got, want, 2e-5)
        parts.append(got)
    assert shifted[0:2].ne(-100).sum() > 0 and shifted[2:4].ne(-100).sum() > 0
    loss = parts[0][0] + parts[1][0]
    assert abs(loss.item() - full[0].item()) < 1e-5 * abs(full[0].item())
    assert _rel(torch.cat([parts[0][1], parts[1][1]]), full[1]) < 2e-5
    assert _rel(parts[0][2] + parts[1][2], full[2]) < 2e-5
    assert _rel(parts[0][3] + parts[1][3], full[3]) < 2e-5


def test_frozen_weight_and_grad_output_scale():
    h, w, _, labels = _inputs((2, 64), 33, 200, seed=7)
    labels[:, ::3] = -100
    hr = h.clone().requires_grad_(True)
    ht = h.clone().requires_grad_(True)
    wf = w.clone()  # frozen (LoRA): no weight gradient is asked for
    (2.5 * fused_linear_cross_entropy_reference(hr, wf, labels)).backward()
    loss = _triton(ht, wf, labels)
    (2.5 * loss).backward()
    assert wf.grad is None
    assert _rel(ht.grad, hr.grad) < 2e-5


def test_second_backward_is_a_clear_error():
    """The gradients are made in the forward and handed out once: a second backward (retain_graph) is refused with a
    message saying so, not a TypeError from inside."""
    h, w, _, labels = _inputs((2, 16), 33, 200, seed=3)
    loss = _triton(h.clone().requires_grad_(True), w.clone().requires_grad_(True), labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated only once"):
        loss.backward()


def test_all_labels_ignored_matches_reference():
    h, w, b, labels = _inputs((2, 16), 24, 50, bias=True, seed=8)
    labels[:] = -100
    want = _run(fused_linear_cross_entropy_reference, h, w, b, labels=labels)
    got = _run(_triton, h, w, b, labels=labels)
    assert torch.isnan(want[0]) and torch.isnan(got[0])  # mean over zero items: 0/0 as in torch
    for a, r in zip(got[1:], want[1:]):
        assert torch.equal(a, r) and a.abs().max() == 0
    got_sum = _triton(h, w, labels=labels, bias=b, num_items_in_batch=7)
    assert got_sum.item() == 0.0


def test_no_grad_loss_only():
    h, w, b, labels = _inputs((3, 40), 20, 130, bias=True, seed=9)
    labels[0, 5:] = -100
    with torch.no_grad():
        got = _triton(h, w, labels, bias=b)
    want = fused_linear_cross_entropy_reference(h, w, labels, bias=b)
    assert got.grad_fn is None
    assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())


def test_fp16_inputs_fp32_accumulation():
    h, w, b, labels = _inputs((2, 60), 32, 257, dtype=torch.float16, bias=True, seed=10)
    labels[1, 30:] = -100
    want = _run(fused_linear_cross_entropy_reference, h, w, b, labels=labels)
    got = _run(_triton, h, w, b, labels=labels)
    _check(got, want, 5e-3)


def test_chunk_rows():
    assert _chunk_rows(8192, 128256, 2, 256 * 2**20) == 1024
    assert _chunk_rows(1000, 1000, 4, 10**9) == 1000
    rows = _chunk_rows(1000, 1000, 4, 4000 * 130)  # at most 130 rows a chunk, balanced chunks
    assert rows <= 130 and -(-1000 // rows) == -(-1000 // 130)


def test_dispatcher_default_options(monkeypatch):
    # The public dispatcher, forced onto the Triton path (interpreter), with the default chunking (one chunk here).
    from litespark_kernels import fused_linear_cross_entropy

    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    h, w, b, labels = _inputs((2, 70), 36, 190, bias=True, seed=11)
    labels[0, 50:] = -100
    want = _run(fused_linear_cross_entropy_reference, h, w, b, labels=labels)
    got = _run(fused_linear_cross_entropy, h, w, b, labels=labels)
    _check(got, want, 2e-5)


@pytest.mark.parametrize("ignored", [0.0, 0.4])
def test_label_count_made_early_gives_the_same_loss_and_gradients(ignored):
    """``label_count=count_labels(shift_labels)`` (made before the decoder, no sync later) changes nothing."""
    from litespark_kernels import count_labels, shifted_labels

    h, w, _, labels = _inputs((3, 70), 45, 300, seed=11)
    g = torch.Generator().manual_seed(3)
    labels[torch.rand(labels.shape, generator=g) < ignored] = -100
    shift = shifted_labels(labels)
    count = count_labels(shift)
    assert count.value() == int((shift != -100).sum())
    want = _run(fused_linear_cross_entropy_reference, h, w, None, shift_labels=shift)
    got = _run(_triton, h, w, None, shift_labels=shift, label_count=count, grad_scale=0.5)
    want = (want[0],) + tuple(t * 0.5 for t in want[1:3]) + (None,)
    _check(got, want, 2e-5)
    with pytest.raises(ValueError, match="other labels"):
        _triton(h[:, :10], w, shift_labels=shift[:, :10], label_count=count)


def test_weight_cast_is_read_instead_of_casting_and_ignored_when_it_does_not_fit():
    """``weight_cast`` (the optimizer's low-precision copy of the weight) is what the loss multiplies by; the
    gradient still goes to ``weight``. A copy of another dtype or shape is ignored."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    weight = torch.randn(37, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 37, (2, 9), generator=g)
    other = (weight.detach() * 2.0).contiguous()  # a stand-in copy that differs, to see which one is read
    got = fused_linear_cross_entropy_triton(hidden, weight, labels, weight_cast=other)
    want = fused_linear_cross_entropy_reference(hidden.detach(), other, labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape
    plain = fused_linear_cross_entropy_reference(hidden.detach(), weight.detach(), labels)
    for bad in (other.to(torch.float64), other[:, :8]):
        torch.testing.assert_close(fused_linear_cross_entropy_triton(hidden, weight, labels, weight_cast=bad), plain,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True])
def test_vocabulary_not_a_multiple_of_8_is_padded_for_the_gemms(bias):
    """Granite's vocabulary (49,155) is odd: the GEMMs run on a weight padded with zero rows to a multiple of 64
    (aligned cuBLAS kernels); loss and every gradient still equal the reference, and grad_weight has the real
    vocabulary's rows."""
    h, w, b, labels = _inputs((2, 300), 123, 1001, bias=bias, seed=11)
    labels[0, :37] = -100
    want = _run(fused_linear_cross_entropy_reference, h, w, b, labels=labels)
    got = _run(_triton, h, w, b, labels=labels)
    _check(got, want, 2e-5)
    assert got[2].shape == (1001, 123) and got[2].is_contiguous()
