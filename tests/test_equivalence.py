"""Litespark vs stock transformers (sdpa, the default backend), float32 on CPU, five families.

Criteria (issue: foundation): logits and every parameter gradient within relative error 1e-4 (padding masks and
packed position_ids batches included); 20 AdamW steps from the same seed give losses equal within 1e-3.
The same checks run on the GPU in bf16 (tests/gpu/test_equivalence_gpu.py).
"""

import copy

import pytest
import torch

import litespark_hf
from tiny_models import FAMILIES, alternating_padded_batches, random_batch, rel_err, tiny_model, train_side_by_side

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")




def make_pair(family, **overrides):
    stock = tiny_model(family, attn_implementation="sdpa", **overrides)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    return stock, lit


def padded_batch():
    ids = random_batch(batch=3, seq=24)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0  # right padding
    mask[1, :3] = 0  # left padding
    return dict(input_ids=ids, attention_mask=mask, labels=padded_labels(ids, mask)), mask.bool()


def padded_labels(ids, mask):
    """Labels of a padded batch: no pad is a target, and no target is "predicted" from a pad (a left-padded row's
    first real token; stock computes that term from the pad token's hidden state, which Litespark's unpadded decoder
    does not compute: litespark_hf.unpadding ignores it)."""
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


def packed_batch():
    lengths = [7, 10, 9]  # three documents in one row, as DataCollatorWithFlattening emits
    ids = random_batch(batch=1, seq=sum(lengths), seed=3)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    labels[0, starts] = -100  # no cross-document prediction of a document's first token
    # use_cache=False: with a KV cache, stock transformers does not detect packed position_ids
    inputs = dict(input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False)
    return inputs, torch.ones_like(ids, dtype=torch.bool)


def plain_batch():
    ids = random_batch(batch=2, seq=24, seed=5)
    return dict(input_ids=ids, labels=ids.clone()), torch.ones_like(ids, dtype=torch.bool)


BATCHES = {"plain": plain_batch, "padded": padded_batch, "packed": packed_batch}


@pytest.mark.parametrize("batch_kind", list(BATCHES))
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_gradients_match_stock(family, batch_kind):
    stock, lit = make_pair(family)
    inputs, valid = BATCHES[batch_kind]()
    stock.eval(), lit.eval()
    # use_cache=False: with a KV cache, transformers does not detect packed position_ids (generation semantics)
    no_labels = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
    with torch.no_grad():
        a = stock(**no_labels).logits
        b = lit(**no_labels).logits
    assert rel_err(b[valid], a[valid]) <= 1e-4

    stock.train(), lit.train()
    loss_a = stock(**inputs).loss
    loss_b = lit(**inputs).loss  # fused linear cross-entropy path (training with labels)
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    loss_a.backward()
    loss_b.backward()
    checked = 0
    for (name, pa), (_, pb) in zip(stock.named_parameters(), lit.named_parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        assert rel_err(pb.grad, pa.grad) <= 1e-4, name
        checked += 1
    assert checked == len(list(stock.parameters()))


def test_packed_batch_does_not_attend_across_documents():
    """Packed row == the documents run one by one (what no cross-document attention means)."""
    _, lit = make_pair("llama")
    lit.eval()
    inputs, _ = packed_batch()
    with torch.no_grad():
        packed = lit(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False).logits[0]
        start = 0
        for n in (7, 10, 9):
            alone = lit(input_ids=inputs["input_ids"][:, start:start + n]).logits[0]
            assert rel_err(packed[start:start + n], alone) <= 1e-5
            start += n


@pytest.mark.parametrize("family", FAMILIES)
def test_twenty_training_steps_match_stock(family):
    stock, lit = make_pair(family)
    history = train_side_by_side((stock, lit), alternating_padded_batches(padded_batch()[0]["attention_mask"],
                                                                          padded_labels))
    for step, (a, b) in enumerate(history):
        assert abs(a - b) <= 1e-3, f"step {step}: {a} vs {b}"
    assert history[-1][0] < history[0][0]  # the model did train
