"""GPU checks of `LitesparkConfig.cuda_graphs` (litespark_hf/graphs.py; run with ``pytest -m gpu``).

Each test trains two copies of one random Llama side by side, Litespark with and without the CUDA graphs, on padded
batches of varying real length (so several length buckets are captured and revisited) and compares every step's
loss and every trainable parameter's gradient; the graphed run must really have replayed graphs (its counters).
"""

import copy

import pytest
import torch

import litespark_hf
from litespark_hf import graphs as G
from tiny_models import rel_err

pytestmark = pytest.mark.gpu

VOCAB = 512
# bf16 autocast: the bucket's longer GEMMs round differently; gradients of the small-norm weights (norm scales) differ
# by up to ~2% between two eager runs of different batch shapes already
BF16_TOL = 5e-2


def _llama(layers=3, hidden=256, inter=512, seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                               max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()


def _pair(**cfg):
    eager = _llama()
    graphed = copy.deepcopy(eager)
    litespark_hf.apply(eager, cuda_graphs=False, **cfg)
    litespark_hf.apply(graphed, cuda_graphs=True, **cfg)
    return eager, graphed


def _batches(n, seed=0, rows=3, max_len=300):
    """Padded batches (right padding) whose real lengths vary from step to step; some repeat a total."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        lengths = torch.randint(5, max_len, (rows,), generator=g)
        if i % 3 == 2:
            lengths = out[-2][2]  # the same real-token total as two steps ago: its bucket is replayed
        seq = int(lengths.max())
        ids = torch.randint(1, VOCAB, (rows, seq), generator=g)
        mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        out.append((ids.cuda(), mask.cuda(), lengths, labels.cuda()))
    return out


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(eager, graphed, tol):
    ge, gg = _grads(eager), _grads(graphed)
    assert ge.keys() == gg.keys() and ge
    worst = max(rel_err(gg[n], ge[n]) for n in ge)
    assert worst < tol, worst


def _optimizer_steps(opts):
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)


def _bf16_losses_agree(eager, graphed, batch):
    le, lg = _step(eager, batch, True), _step(graphed, batch, True)
    assert abs(le.item() - lg.item()) <= 1e-2 * abs(le.item()), (le.item(), lg.item())


def _step(model, batch, autocast):
    ids, mask, _, labels = batch
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach()


@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_training_equals_eager(autocast):
    """fp32 weights, torch AdamW (fp32 math, or bf16 autocast): 8 steps over several buckets."""
    eager, graphed = _pair()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (eager, graphed)]
    for i, batch in enumerate(_batches(8)):
        # fp32: the first step to GEMM reordering (the bucket's longer rows), later steps through AdamW's
        # normalised updates of near-zero gradients
        tol = BF16_TOL if autocast else (1e-5 if i == 0 else 1e-3)
        le, lg = _step(eager, batch, autocast), _step(graphed, batch, autocast)
        assert abs(le.item() - lg.item()) <= tol * abs(le.item()), (le.item(), lg.item())
        _compare(eager, graphed, tol)
        # the fused projections' weight gradients were written by the graph in place, into the shared buffers
        manager = G.manager_of(graphed)
        attn = graphed.model.layers[1].self_attn
        flat = manager._flat[tuple(id(m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj))][0]
        assert attn.k_proj.weight.grad.data_ptr() == flat[attn.q_proj.weight.shape[0]:].data_ptr()
        _optimizer_steps(opts)
    stats = G.manager_of(graphed).stats
    assert stats["graphed"] == 8 and 1 <= stats["captures"] < 8, dict(stats)


def test_litespark_adamw_shadow_and_gradient_accumulation():
    """bf16 autocast with LitesparkAdamW's cast shadow (one key per bucket across steps) and two micro-batches per
    optimizer step (the second backward adds to gradients that hold the first one's graph buffers)."""
    from litespark_hf.optim import LitesparkAdamW

    eager, graphed = _pair()
    opts = [LitesparkAdamW(m.parameters(), lr=1e-3, model=m, shadow_dtype=torch.bfloat16) for m in (eager, graphed)]
    assert all(o.shadow is not None for o in opts)
    batches = _batches(12, seed=1)
    for k in range(0, 12, 2):
        for batch in batches[k:k + 2]:
            _bf16_losses_agree(eager, graphed, batch)
        _compare(eager, graphed, BF16_TOL)
        _optimizer_steps(opts)
    stats = G.manager_of(graphed).stats
    assert stats["graphed"] == 12 and "eager: bucket keys exhausted" not in stats, dict(stats)
    # the weights after six optimizer steps
    worst = max(rel_err(pg, pe) for pe, pg in zip(eager.parameters(), graphed.parameters()))
    assert worst < 1e-2, worst


def test_lora_adapters_equal_eager():
    from peft import LoraConfig, get_peft_model

    base_e = _llama()
    base_g = copy.deepcopy(base_e)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    pe, pg = get_peft_model(base_e, lora), get_peft_model(base_g, copy.deepcopy(lora))
    with torch.no_grad():  # the same random adapters in both (PEFT's B = 0 would make the first step trivial)
        for (_, a), (_, b) in zip(pe.named_parameters(), pg.named_parameters()):
            if a.requires_grad:
                a.normal_(0, 0.02)
                b.copy_(a)
    litespark_hf.apply(pe, cuda_graphs=False)
    litespark_hf.apply(pg, cuda_graphs=True)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (pe, pg)]
    for batch in _batches(6, seed=2):
        _bf16_losses_agree(pe, pg, batch)
        _compare(pe, pg, BF16_TOL)
        _optimizer_steps(opts)
    assert G.manager_of(pg).stats["graphed"] == 6
    # the reference pass of DPO LoRA: adapters disabled, no grad -> eager, same as the eager model's
    batch = _batches(1, seed=5)[0]
    with torch.no_grad(), pe.disable_adapter(), pg.disable_adapter():
        a = pe(input_ids=batch[0], attention_mask=batch[1]).logits
        b = pg(input_ids=batch[0], attention_mask=batch[1]).logits
    assert rel_err(b, a) < 1e-5


def test_fallbacks_keep_values():
    """A hook on a layer, a no-grad forward and a second forward before the first one's backward run eagerly;
    values are unchanged throughout."""
    eager, graphed = _pair()
    b1, b2 = _batches(2, seed=3)
    manager = G.manager_of(graphed)

    handle = graphed.model.layers[1].register_forward_hook(lambda *a: None)
    _step(eager, b1, False), _step(graphed, b1, False)
    handle.remove()
    assert manager.stats["eager: module hooks"] == 1 and manager.stats["graphed"] == 0
    _compare(eager, graphed, 1e-4)
    for m in (eager, graphed):
        m.zero_grad(set_to_none=True)

    # two forwards, then one backward of their sum: the second forward must not reuse the first one's buffers
    losses = []
    for m in (eager, graphed):
        la = m(input_ids=b1[0], attention_mask=b1[1], labels=b1[3]).loss
        lb = m(input_ids=b2[0], attention_mask=b2[1], labels=b2[3]).loss
        (la + 2 * lb).backward()
        losses.append((la.item(), lb.item()))
    assert manager.stats["graphed"] == 1 and manager.stats["eager: a graphed forward awaits its backward"] == 1
    assert abs(losses[0][0] - losses[1][0]) < 1e-4 * abs(losses[0][0])
    _compare(eager, graphed, 1e-4)
    del la, lb  # their autograd graphs (made on the default stream) would make the next capture fail and retry

    with torch.no_grad():
        a = eager(input_ids=b2[0], attention_mask=b2[1]).logits
        b = graphed(input_ids=b2[0], attention_mask=b2[1]).logits
    assert rel_err(b, a) < 1e-5

    # a forward whose graph is dropped without a backward does not block the next one
    graphed(input_ids=b1[0], attention_mask=b1[1], labels=b1[3])
    before = manager.stats["graphed"]
    _step(graphed, b2, False)
    assert manager.stats["graphed"] == before + 1


def test_backward_twice_is_refused():
    _, graphed = _pair()
    b = _batches(1, seed=4)[0]
    hidden = graphed.model(input_ids=b[0], attention_mask=b[1]).last_hidden_state
    assert G.manager_of(graphed).stats["graphed"] == 1
    hidden.square().sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        hidden.square().sum().backward()


@pytest.mark.parametrize("mode", ["padded", "padding_free"])
def test_trl_sft_with_graphs_equals_without(tmp_path, mode):
    """TRL's SFTTrainer, use_litespark, bf16, TRL's defaults otherwise: per-step losses with cuda_graphs as
    without, and the graphs were used."""
    from datasets import Dataset

    from litespark_hf.efficiency import post_data as PD

    g = torch.Generator().manual_seed(3)
    lengths = [int(n) for n in torch.randint(8, 200, (48,), generator=g)]
    ds = Dataset.from_dict({"input_ids": [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in lengths]})
    extra = {"padding_free": True, "max_length": None} if mode == "padding_free" else {"max_length": 256}
    logs, managers = [], []
    for graphs in (False, True):
        model = _llama()
        args = litespark_hf.SFTConfig(
            output_dir=str(tmp_path / str(graphs)), max_steps=10, per_device_train_batch_size=4, report_to=[],
            use_litespark=True, litespark_config={"cuda_graphs": graphs}, bf16=True, learning_rate=1e-3,
            save_strategy="no", logging_steps=1, seed=0, **extra)
        trainer = litespark_hf.SFTTrainer(model=model, args=args, train_dataset=ds,
                                          processing_class=PD.id_tokenizer(VOCAB))
        trainer.train()
        logs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        managers.append(G.manager_of(trainer.model))
    assert managers[0] is None and managers[1] is not None
    stats = managers[1].stats
    assert stats["graphed"] >= 8, dict(stats)
    assert len(logs[0]) == len(logs[1]) == 10
    for a, b in zip(*logs):
        assert abs(a - b) <= 2e-2 * abs(a), (logs[0], logs[1])
