"""``LitesparkConfig.attention_cudnn`` on the CPU: which calls it would send to cuDNN SDPA (plain causal, equal
lengths, bf16/fp16, head dim 64/128, nothing else), the modules it marks and `restore` unmarks, and that off a GPU
the model computes exactly what it computes without it (the kernel's fallbacks run)."""

import copy

import pytest
import torch

import litespark_hf
from litespark_kernels.ops.attention import cudnn_plain_call
from tiny_models import random_batch, tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_plain_call_predicate():
    q = torch.zeros(2, 8, 32, 64, dtype=torch.bfloat16)
    k = torch.zeros(2, 2, 32, 64, dtype=torch.bfloat16)
    seg = torch.zeros(2, 32, dtype=torch.int32)
    base = dict(causal=True, q_segment_ids=None, kv_segment_ids=None, sliding_window=None, dropout_p=0.0,
                softcap=None)
    assert cudnn_plain_call(q, k, **base)
    assert cudnn_plain_call(q.to(torch.float16), k.to(torch.float16), **base)
    assert cudnn_plain_call(torch.zeros(1, 4, 9, 128, dtype=torch.bfloat16),
                            torch.zeros(1, 4, 9, 128, dtype=torch.bfloat16), **base)
    for change in (dict(causal=False), dict(q_segment_ids=seg, kv_segment_ids=seg), dict(sliding_window=8),
                   dict(dropout_p=0.1), dict(softcap=30.0)):
        assert not cudnn_plain_call(q, k, **{**base, **change}), change
    assert not cudnn_plain_call(q.float(), k.float(), **base)  # fp32
    assert not cudnn_plain_call(q[..., :32].contiguous(), k[..., :32].contiguous(), **base)  # head dim 32
    assert not cudnn_plain_call(q[:, :, :1], k, **base)  # a decoding step (1 query, 32 keys)


def test_flag_marks_attention_modules_and_changes_nothing_off_gpu():
    ref = tiny_model("llama")
    model = copy.deepcopy(ref)
    litespark_hf.apply(ref)
    litespark_hf.apply(model, attention_cudnn=True)
    marked = [n for n, m in model.named_modules() if m.__dict__.get("_litespark_attention_cudnn")]
    assert marked == [f"model.layers.{i}.self_attn" for i in range(ref.config.num_hidden_layers)]
    ids = random_batch(2, 24)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    for kw in (dict(input_ids=ids), dict(input_ids=ids, attention_mask=mask)):
        assert torch.equal(model(**kw).logits, ref(**kw).logits)
    litespark_hf.restore(model)
    assert not any(m.__dict__.get("_litespark_attention_cudnn") for m in model.modules())
    assert litespark_hf.LitesparkConfig.from_any({"attention_cudnn": True}).attention_cudnn
    assert not litespark_hf.LitesparkConfig().attention_cudnn
