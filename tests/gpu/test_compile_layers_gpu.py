"""``compile_layers`` on CUDA (inductor): a Llama-shaped model with each decoder layer compiled, padded batches of
three lengths (unpadded by the eager hook), bf16 autocast over fp32 weights: no graph break, the loss within 1e-3
relative of the eager Litespark model's and every gradient within 2e-2 (Inductor fuses the glue ops in another
order; the kernels are the same custom ops)."""

import copy

import pytest
import torch

import litespark_hf

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_compiled_layers_match_eager_on_padded_batches():
    import torch._dynamo
    from transformers import AutoConfig, AutoModelForCausalLM

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=512, intermediate_size=1408,
                               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                               max_position_embeddings=2048)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()
    comp = copy.deepcopy(eager)
    litespark_hf.apply(eager)
    litespark_hf.apply(comp, compile_layers=True)
    g = torch.Generator(device="cuda").manual_seed(1)
    for seq, cuts in ((512, (512, 300, 77, 450)), (640, (640, 12, 600, 333)), (300, (300, 299, 150, 1))):
        ids = torch.randint(0, 4096, (4, seq), generator=g, device="cuda")
        mask = (torch.arange(seq, device="cuda")[None] < torch.tensor(cuts, device="cuda")[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        outs = []
        for m in (eager, comp):
            m.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            outs.append((loss.item(), [p.grad.float().clone() for p in m.parameters()]))
        assert abs(outs[0][0] - outs[1][0]) <= 1e-3 * outs[0][0], seq
        for a, b in zip(outs[0][1], outs[1][1]):
            assert ((a - b).norm() / a.norm().clamp_min(1e-12)).item() <= 2e-2, seq
    assert not dict(torch._dynamo.utils.counters["graph_break"])
