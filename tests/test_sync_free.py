"""No host reads of device values in a plain training forward: the host can run ahead of the GPU across steps.

On CPU a host sync shows as ``aten._local_scalar_dense`` (what ``bool()``, ``.item()`` and ``.tolist()`` run on a
tensor); counting that op in the decoder stack's forward finds the packed-document checks (transformers'
``find_packed_sequence_indices`` and the backend's own) that drain the GPU queue at the start of every step.
"""

from __future__ import annotations

import pytest
import torch

import litespark_hf
from litespark_hf import attention as A
from tiny_models import FAMILIES, OpLog, random_batch, tiny_model


def _reads(stack, **inputs) -> tuple[int, torch.Tensor]:
    with OpLog() as ops:
        out = stack(**inputs).last_hidden_state
    return ops.counts["_local_scalar_dense"] + ops.counts["is_nonzero"], out


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_batch_forward_reads_nothing_and_matches_stock(family):
    ids = random_batch(2, 24)
    stock = tiny_model(family, attn_implementation="sdpa")
    # without a cache, transformers checks the arange it made for packed documents
    stock_reads, want = _reads(stock.model, input_ids=ids, use_cache=False)
    assert stock_reads >= 1
    model = litespark_hf.apply(tiny_model(family, attn_implementation="sdpa"))
    for use_cache in (False, True):  # with the config's use_cache (a fresh cache in training) only ours checked
        reads, got = _reads(model.model, input_ids=ids, use_cache=use_cache)
        assert reads == 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_packed_position_ids_are_still_checked_and_honoured():
    ids = random_batch(1, 24)
    packed = torch.cat([torch.arange(10), torch.arange(14)])[None]
    stock = tiny_model("llama", attn_implementation="sdpa")
    want = stock.model(input_ids=ids, position_ids=packed, use_cache=False).last_hidden_state
    model = litespark_hf.apply(tiny_model("llama", attn_implementation="sdpa"))
    reads, got = _reads(model.model, input_ids=ids, position_ids=packed, use_cache=False)
    assert reads >= 1  # a caller's position_ids are looked at
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the second document must not see the first: its outputs equal a forward of it alone
    alone = model.model(input_ids=ids[:, 10:]).last_hidden_state
    torch.testing.assert_close(got[:, 10:], alone, rtol=1e-4, atol=1e-5)


def test_own_positions_only_for_tensors_litespark_made():
    import transformers.masking_utils as mu

    model = litespark_hf.apply(tiny_model("llama", attn_implementation="sdpa"))
    ids = random_batch(2, 12)
    seen = {}
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, a, kw: seen.update(pos=kw.get("position_ids")), with_kwargs=True)
    model.model(input_ids=ids)
    hook.remove()
    pos = seen["pos"]
    assert torch.equal(pos, torch.arange(12)[None])
    assert A._own_positions.holds(pos) and A._own_positions.holds(pos.expand(2, -1))
    assert mu.find_packed_sequence_indices(pos.expand(2, -1)) is None
    # an equal tensor made elsewhere is not trusted, and a packed one is found
    other = torch.arange(12)[None].expand(2, -1)
    assert not A._own_positions.holds(other)
    packed = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
    assert mu.find_packed_sequence_indices(packed) is not None
    # changed in place: no longer trusted
    pos.add_(0)
    assert not A._own_positions.holds(pos)


def test_no_positions_made_with_a_cache_or_caller_positions():
    model = litespark_hf.apply(tiny_model("llama", attn_implementation="sdpa"))
    ids = random_batch(1, 8)
    own = torch.arange(8)[None]
    assert A.position_pre_hook(model.model, (), {"input_ids": ids, "position_ids": own}) is None
    assert A.position_pre_hook(model.model, (), {"input_ids": ids, "past_key_values": object()}) is None
    assert A.position_pre_hook(model.model, (), {"input_ids": ids, "cu_seq_lens_q": torch.tensor([0, 8])}) is None
    args, kwargs = A.position_pre_hook(model.model, (), {"input_ids": ids})
    assert torch.equal(kwargs["position_ids"], own)
    # generation (a KV cache) gives the same tokens as the stock model
    stock = tiny_model("llama", attn_implementation="sdpa")
    want = stock.generate(ids, max_new_tokens=4, do_sample=False)
    got = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_restore_removes_the_position_hook():
    # the decoder stack's pre-hooks: the position hook, the checkpoint_layers planner and (with unpad) the unpadding
    from litespark_hf.checkpointing import _Planner

    def planners(m):
        return sum(isinstance(h, _Planner) for h in m.model._forward_pre_hooks.values())

    model = litespark_hf.apply(tiny_model("llama", attn_implementation="sdpa"), unpad=False)
    assert len(model.model._forward_pre_hooks) == 2 and planners(model) == 1
    litespark_hf.restore(model)
    assert len(model.model._forward_pre_hooks) == 0
    litespark_hf.apply(model, unpad=False)
    litespark_hf.apply(model, unpad=False)  # twice: still one of each
    assert len(model.model._forward_pre_hooks) == 2 and planners(model) == 1
    litespark_hf.apply(model, unpad=False, checkpoint_layers="all")  # no planner
    assert len(model.model._forward_pre_hooks) == 1 and planners(model) == 0
    litespark_hf.restore(model)
    litespark_hf.apply(model)  # with the unpadding (default): its pre-hook and post-hook join, once
    litespark_hf.apply(model)
    assert len(model.model._forward_pre_hooks) == 3 and len(model.model._forward_hooks) == 1
    litespark_hf.restore(model)
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks


def test_padding_free_boundaries_give_the_documents_without_a_read():
    """A padding-free batch with ``cu_seq_lens_q`` (TRL's ``padding_free``, ``DataCollatorWithFlattening``): no look
    at ``position_ids`` (transformers' packed check and the backend's own would each read one), the same outputs as
    stock from the positions alone, the second document blind to the first; the caller's tensor is left unmarked."""
    ids = random_batch(1, 24)
    packed = torch.cat([torch.arange(10), torch.arange(14)])[None]
    cu = torch.tensor([0, 10, 24], dtype=torch.int32)
    stock = tiny_model("llama", attn_implementation="sdpa")
    want = stock.model(input_ids=ids, position_ids=packed, use_cache=False).last_hidden_state
    model = litespark_hf.apply(tiny_model("llama", attn_implementation="sdpa"))
    reads, got = _reads(model.model, input_ids=ids, position_ids=packed, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                        max_length_q=14, max_length_k=14, use_cache=False)
    assert reads == 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    alone = model.model(input_ids=ids[:, 10:]).last_hidden_state
    torch.testing.assert_close(got[:, 10:], alone, rtol=1e-4, atol=1e-5)
    assert not hasattr(packed, "_litespark_segments")
