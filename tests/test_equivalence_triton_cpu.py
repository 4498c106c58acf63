"""The equivalence check with every Triton kernel on, in Triton's CPU interpreter (float32).

`LITESPARK_FORCE_TRITON=1` sends CPU tensors to the Triton kernels (run by `TRITON_INTERPRET=1`, set in conftest).
Head dim 64 so that the attention kernel takes the inputs. Criteria as in test_equivalence.py (relative error
<= 1e-4 for logits and every gradient); the kernels accumulate in fp32, so only summation order differs.
"""

import copy

import pytest
import torch

import litespark_hf
from tiny_models import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZE = dict(hidden_size=128, intermediate_size=160, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
            num_hidden_layers=1)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("family", ["llama", "starcoder2"])
def test_tiny_model_with_triton_kernels_matches_stock(family, monkeypatch):
    monkeypatch.setenv("LITESPARK_FORCE_TRITON", "1")
    stock = tiny_model(family, attn_implementation="sdpa", **SIZE)
    lit = copy.deepcopy(stock)
    litespark_hf.apply(lit)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -7:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    valid = mask.bool()
    stock.eval(), lit.eval()
    with torch.no_grad():
        assert rel_err(lit(input_ids=ids, attention_mask=mask).logits[valid],
                       stock(input_ids=ids, attention_mask=mask).logits[valid]) <= 1e-4
    stock.train(), lit.train()
    la = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    lb = lit(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(la.item() - lb.item()) <= 1e-5 * la.item()
    la.backward()
    lb.backward()
    for (name, pa), pb in zip(stock.named_parameters(), lit.parameters()):
        assert rel_err(pb.grad, pa.grad) <= 1e-4, name
