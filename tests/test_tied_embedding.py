"""Tied input/output embeddings: the lookup's gradient is added into the fused loss's weight gradient in place.

Runs the fused cross-entropy's Triton path in Triton's CPU interpreter (`LITESPARK_FORCE_TRITON=1`, float32), so
the loss hands its weight gradient to the lookup (`litespark_kernels.TiedGrad`). Criteria: every gradient within
1e-5 relative of the stock model's (fp32; only the summation order differs), the stock dense embedding gradient
never built on that path, and the stock path kept where the loss does not hand one over.
"""

import copy

import pytest
import torch

import litespark_hf
from tiny_models import OpLog, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZE = dict(hidden_size=128, intermediate_size=160, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            num_hidden_layers=1, tie_word_embeddings=True, pad_token_id=0)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _pair():
    stock = tiny_model("llama", attn_implementation="sdpa", **SIZE)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return stock, lit


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (2, 40), generator=g)
    ids[1, :5] = 0  # the padding token (padding_idx 0): its embedding row gets no gradient
    return ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
def test_fused_loss_path_adds_into_the_loss_gradient_and_matches_stock(monkeypatch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    stock, lit = _pair()
    assert type(lit.model.embed_tokens).__name__ == "LitesparkEmbedding"
    assert litespark_hf.swapped_counts(lit)["tied_embedding"] == 1
    for step in range(2):  # two micro-batches: the second accumulates into the existing .grad
        ids = _batch(step)
        stock(input_ids=ids, labels=ids).loss.backward()
        loss = lit(input_ids=ids, labels=ids).loss
        with OpLog() as ops:
            loss.backward()
        assert "embedding_dense_backward" not in ops.seen and "index_put_" in ops.seen
    w = stock.model.embed_tokens.weight
    assert w.grad[0].abs().sum() > 0  # the LM head's gradient of the padding row is kept ...
    for (name, pa), pb in zip(stock.named_parameters(), lit.parameters()):
        assert rel_err(pb.grad, pa.grad) <= 1e-5, name
    # ... and it is all there is for that row: the lookup added nothing to it
    head_only = copy.deepcopy(stock)
    head_only.zero_grad()
    ids = _batch(0)
    with torch.no_grad():
        h = head_only.model(input_ids=ids).last_hidden_state
    head_only.lm_head.weight.grad = None
    loss = torch.nn.functional.cross_entropy(head_only.lm_head(h)[:, :-1].reshape(-1, 128), ids[:, 1:].reshape(-1))
    loss.backward()
    lit.zero_grad()
    lit(input_ids=ids, labels=ids).loss.backward()
    torch.testing.assert_close(lit.lm_head.weight.grad[0], head_only.lm_head.weight.grad[0], rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
def test_other_losses_keep_the_stock_embedding_gradient(monkeypatch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    stock, lit = _pair()
    ids = _batch(1)
    # logits, no labels: not the fused path, so no hand-over slot
    for m in (stock, lit):
        m(input_ids=ids).logits.float().pow(2).mean().backward()
    for (name, pa), pb in zip(stock.named_parameters(), lit.parameters()):
        assert rel_err(pb.grad, pa.grad) <= 1e-5, name
    # the lookup alone, given a slot that the loss never filled: the stock dense gradient
    from litespark_kernels import TiedGrad, tied_embedding

    w = torch.randn(128, 16, requires_grad=True)
    slot = TiedGrad()
    out = tied_embedding(ids, w, 0, slot)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    want = torch.ops.aten.embedding_dense_backward(g, ids, 128, 0, False)
    torch.testing.assert_close(w.grad, want)
    assert slot.grad is None


def test_offer_keeps_only_a_fitting_gradient():
    from litespark_kernels import TiedGrad

    w = torch.zeros(8, 4)
    slot = TiedGrad()
    slot.offer(torch.ones(8, 4), w)
    assert slot.grad is None  # the lookup did not run in this forward
    slot.used = True
    slot.offer(torch.ones(8, 4, dtype=torch.float64), w)
    slot.offer(torch.ones(4, 8).t(), w)
    assert slot.grad is None
    g = torch.ones(8, 4)
    slot.offer(g, w)
    assert slot.grad is g
