"""Padded batches run the decoder on their real tokens only (`litespark_hf.unpadding`), float32 on CPU.

Criteria: the decoder layers really see one packed row of the real tokens; every real token's hidden state, the loss
and every parameter gradient equal stock (sdpa) within 1e-5 relative (1e-4 for gradients), with right and left
padding in one batch, under gradient checkpointing, and through TRL's fused LM head (per-token log-probs, as SFT and
DPO use it); generation and cache-building forwards are left padded; ``unpad=False`` keeps the padded path.
"""

import copy

import pytest
import torch

import litespark_hf
from tiny_models import FAMILIES, VOCAB, random_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def batch():
    ids = random_batch(batch=3, seq=20, seed=7)
    mask = torch.ones_like(ids)
    mask[0, -6:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    mask[2, -1:] = 0
    return ids, mask, labels_for(ids, mask)


def labels_for(ids, mask):
    """Pads are not predicted, and neither is a left-padded row's first real token (its "prediction" would come
    from a pad token: stock computes it from the pad's hidden state, Litespark ignores it - see unpadding.py)."""
    labels = ids.masked_fill(mask == 0, -100)
    after_pad = torch.zeros_like(mask, dtype=torch.bool)
    after_pad[:, 1:] = (mask[:, :-1] == 0) & (mask[:, 1:] != 0)
    return labels.masked_fill(after_pad, -100)


def pair(family="llama", **cfg):
    stock = tiny_model(family, attn_implementation="sdpa")
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit, **cfg)
    return stock, lit


class LayerShapes:
    """Records the hidden-state shape every decoder layer is called with."""

    def __init__(self, model):
        self.shapes = []
        self.handles = [layer.register_forward_pre_hook(self._record) for layer in model.model.layers]

    def _record(self, module, args):
        self.shapes.append(tuple(args[0].shape))


@pytest.mark.parametrize("family", FAMILIES)
def test_training_forward_runs_real_tokens_only_and_matches_stock(family):
    stock, lit = pair(family)
    stock.train(), lit.train()
    ids, mask, labels = batch()
    seen = LayerShapes(lit)
    loss_b = lit(input_ids=ids, attention_mask=mask, labels=labels).loss
    real = int(mask.sum())
    assert seen.shapes and all(s[:2] == (1, real) for s in seen.shapes), seen.shapes
    loss_a = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    loss_a.backward()
    loss_b.backward()
    for (name, pa), (_, pb) in zip(stock.named_parameters(), lit.named_parameters()):
        assert rel_err(pb.grad, pa.grad) <= 1e-4, name


def test_label_after_a_pad_is_ignored():
    stock, lit = pair()
    stock.train(), lit.train()
    ids, mask, _ = batch()
    raw = ids.masked_fill(mask == 0, -100)  # row 1's first real token is a target, "predicted" from a pad
    assert not torch.equal(raw, labels_for(ids, mask))
    b = lit(input_ids=ids, attention_mask=mask, labels=raw).loss
    a = stock(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask)).loss
    assert abs(a.item() - b.item()) <= 1e-5 * abs(a.item())


def test_hidden_states_equal_at_real_tokens_zero_at_pads():
    stock, lit = pair()
    ids, mask, _ = batch()
    with torch.no_grad():
        a = stock.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        b = lit.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    assert b.shape == a.shape
    valid = mask.bool()
    assert rel_err(b[valid], a[valid]) <= 1e-5
    assert torch.count_nonzero(b[~valid]) == 0


def test_under_gradient_checkpointing():
    stock, lit = pair()
    for m in (stock, lit):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
    ids, mask, labels = batch()
    seen = LayerShapes(lit)
    loss_b = lit(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_a = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss_a.backward()
    loss_b.backward()
    assert seen.shapes and all(s[1] == int(mask.sum()) for s in seen.shapes)
    assert all(layer.gradient_checkpointing for layer in lit.model.layers)
    # equal gradients: the recomputed layers saw the same documents (segment ids ride on the saved position_ids)
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    for (name, pa), (_, pb) in zip(stock.named_parameters(), lit.named_parameters()):
        assert rel_err(pb.grad, pa.grad) <= 1e-4, name


def test_trl_fused_lm_head_log_probs_match_stock():
    """TRL's SFT/DPO trainers call ``model(..., fused_lm_head=True)`` (no KV cache); the reference pass runs in eval
    mode under no_grad."""
    from trl.trainer.utils import add_fused_lm_head

    stock, lit = pair()
    add_fused_lm_head(stock)
    add_fused_lm_head(lit)
    ids, mask, labels = batch()
    for train in (True, False):
        stock.train(train), lit.train(train)
        seen = LayerShapes(lit)
        a = stock(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        b = lit(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        assert all(s[1] == int(mask.sum()) for s in seen.shapes)
        valid = labels[:, 1:] != -100
        assert rel_err(b.log_probs[valid], a.log_probs[valid]) <= 1e-5
        assert abs(a.loss.item() - b.loss.item()) <= 1e-5 * abs(a.loss.item())


def test_generation_and_cache_forwards_stay_padded():
    stock, lit = pair()
    stock.eval(), lit.eval()
    ids, mask, _ = batch()
    left = torch.ones_like(mask)
    left[0, :5] = 0  # generation uses left padding
    seen = LayerShapes(lit)
    with torch.no_grad():
        out = lit(input_ids=ids, attention_mask=left)  # eval, use_cache unset: the caller may want the cache
    assert out.past_key_values is not None
    assert all(s[:2] == tuple(ids.shape) for s in seen.shapes)
    gen_a = stock.generate(input_ids=ids, attention_mask=left, max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
    gen_b = lit.generate(input_ids=ids, attention_mask=left, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(gen_a, gen_b)


def test_no_padding_and_switch_off():
    _, lit = pair()
    lit.train()
    ids = random_batch(batch=2, seq=12, seed=3)
    seen = LayerShapes(lit)
    lit(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    assert all(s[:2] == (2, 12) for s in seen.shapes)  # nothing to gather

    _, off = pair(unpad=False)
    off.train()
    ids, mask, labels = batch()
    seen = LayerShapes(off)
    off(input_ids=ids, attention_mask=mask, labels=labels)
    assert all(s[:2] == tuple(ids.shape) for s in seen.shapes)
    litespark_hf.restore(off)
    assert not off.model._forward_hooks and not off.model._forward_pre_hooks


def test_inputs_embeds_and_all_pad_row():
    stock, lit = pair()
    stock.train(), lit.train()
    ids, mask, labels = batch()
    mask[2] = 0  # a row with no real token at all
    labels = labels_for(ids, mask)
    embeds = stock.get_input_embeddings()(ids).detach()
    a = stock(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    b = lit(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert torch.isfinite(b) and abs(a.item() - b.item()) <= 1e-5 * abs(a.item())
    assert VOCAB == stock.config.vocab_size


def test_cpu_default_keeps_padded_batches_padded(monkeypatch):
    """Without the attention kernel (CPU) the packed row would cost (rows x seq)^2 in the reference attention: only
    CUDA tensors (or LITESPARK_UNPAD_CPU=1, which the test suite sets) are unpadded. The label rule holds anyway."""
    monkeypatch.delenv("LITESPARK_UNPAD_CPU", raising=False)
    stock, lit = pair()
    stock.train(), lit.train()
    ids, mask, labels = batch()
    seen = LayerShapes(lit)
    raw = ids.masked_fill(mask == 0, -100)
    b = lit(input_ids=ids, attention_mask=mask, labels=raw).loss
    assert all(s[:2] == tuple(ids.shape) for s in seen.shapes)
    a = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(a.item() - b.item()) <= 1e-5 * abs(a.item())


def test_a_count_from_the_host_gathers_without_a_read_and_only_for_that_mask():
    """`note_token_count` (what the trainers hand over from `TokenCountingCollator`): the gather is
    ``nonzero_static`` of that size, no device read, the same outputs; a mask changed in place since, or another
    tensor, is read as before."""
    from tiny_models import OpLog

    from litespark_hf import unpadding

    stock, lit = pair()
    ids, mask, _ = batch()
    with torch.no_grad():
        want = stock.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        unpadding.note_token_count(mask, int(mask.sum()))
        with OpLog() as ops:
            got = lit.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        assert ops.counts["nonzero"] == 0 and ops.counts["nonzero_static"] == 1
        valid = mask.bool()
        assert rel_err(got[valid], want[valid]) <= 1e-5
        for other in (mask.clone(), mask):  # another tensor; then the noted one changed in place
            if other is mask:
                mask[2, -1] = 1
            with OpLog() as ops:
                lit.model(input_ids=ids, attention_mask=other, use_cache=False)
            assert ops.counts["nonzero"] == 1 and ops.counts["nonzero_static"] == 0


def test_token_counting_collator_counts_on_the_cpu_and_pops_cleanly():
    import pickle

    from transformers import DataCollatorWithPadding

    from litespark_hf import unpadding
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    inner = DataCollatorWithPadding(tok)
    collate = pickle.loads(pickle.dumps(unpadding.TokenCountingCollator(inner)))  # data-loader workers pickle it
    assert collate.tokenizer is inner.tokenizer or collate.tokenizer.vocab_size == tok.vocab_size
    out = collate([{"input_ids": [5, 6, 7]}, {"input_ids": [5, 6, 7, 8, 9]}])
    assert out[unpadding.TOKEN_COUNT_KEY] == 8 == int(out["attention_mask"].sum())
    inputs = dict(out)
    unpadding.pop_token_count(inputs)
    assert unpadding.TOKEN_COUNT_KEY not in inputs
    assert unpadding._known.get(inputs["attention_mask"]) == 8
    assert unpadding._known.get(inputs["attention_mask"].clone()) is None
    # a batch without a 2-D mask gets no count
    assert unpadding.TOKEN_COUNT_KEY not in unpadding.TokenCountingCollator(lambda f: {"input_ids": torch.ones(1, 3)})([])
