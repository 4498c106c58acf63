"""`LitesparkConfig.cuda_graphs` on the CPU: buckets, installation, the layers' dispatch, and that nothing changes where
graphs cannot run. The graphs themselves are checked on the GPU (tests/gpu/test_cuda_graphs_gpu.py)."""

import pytest
import torch

import litespark_hf
from litespark_hf import graphs as G
from tiny_models import random_batch, tiny_model


def test_bucket_covers_the_row_with_bounded_filler():
    previous = 0
    for tokens in list(range(1, 3000)) + [4095, 4096, 4097, 8191, 8192, 8193, 30000]:
        b = G.bucket(tokens, per_octave=8)
        assert b >= tokens and b % G.QUANTUM == 0
        assert b >= previous  # monotone: a longer row never gets a smaller bucket
        previous = b
        if tokens > G.QUANTUM * 8:
            assert (b - tokens) / tokens <= 1 / 8
    assert G.bucket(2800, per_octave=8) == 2816 and G.bucket(2800, per_octave=2) == 3072
    assert G.bucket(100) == G.QUANTUM


def test_install_restore_and_reapply():
    model = tiny_model("llama", num_hidden_layers=3)
    litespark_hf.apply(model, cuda_graphs=True)
    manager = G.manager_of(model)
    assert manager is not None and len(manager.layers) == 3
    assert [layer.__dict__[G.GRAPHS_ATTR] for layer in model.model.layers] == [(manager, i) for i in range(3)]
    litespark_hf.apply(model, cuda_graphs=False)
    assert G.manager_of(model) is None
    assert not any(G.GRAPHS_ATTR in m.__dict__ for m in model.modules())
    litespark_hf.apply(model, cuda_graphs=True)
    litespark_hf.restore(model)
    assert G.manager_of(model) is None and not any(G.GRAPHS_ATTR in m.__dict__ for m in model.modules())


def test_config_rejects_a_non_boolean():
    with pytest.raises(ValueError, match="cuda_graphs"):
        litespark_hf.LitesparkConfig(cuda_graphs="yes")


@pytest.mark.parametrize("family", ["granite", "mixtral"])
def test_layers_that_change_the_residual_path_or_route_experts_are_left_eager(family, caplog):
    model = tiny_model(family)
    with caplog.at_level("INFO", logger="litespark_hf.graphs"):
        litespark_hf.apply(model, cuda_graphs=True)
    assert G.manager_of(model) is None
    assert any("cuda_graphs" in r.getMessage() and "eagerly" in r.getMessage() for r in caplog.records)


def test_cpu_training_is_unchanged():
    """On the CPU every forward is eager (graphs need CUDA): same loss and gradients as without the option."""
    ids = random_batch(batch=2, seq=20)
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0
    results = []
    for graphs in (False, True):
        model = tiny_model("llama", num_hidden_layers=3)
        litespark_hf.apply(model, cuda_graphs=graphs)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_later_layers_pass_the_replayed_output_through(monkeypatch):
    """The dispatch: when the first layer's call is answered by the graphs (here a stand-in for the replay), the
    other layers return that very tensor untouched; any other input to them runs the layer."""
    model = tiny_model("llama", num_hidden_layers=3)
    litespark_hf.apply(model, cuda_graphs=True)
    manager = G.manager_of(model)
    layers = model.model.layers
    calls = []

    def fake_run(x, position_ids, position_embeddings):
        calls.append(x.shape)
        return x * 3.0

    monkeypatch.setattr(manager, "_ineligible", lambda *a: None)
    monkeypatch.setattr(manager, "_run", fake_run)
    x = torch.randn(1, 7, 64)
    pos = torch.arange(7)[None]
    rope = model.model.rotary_emb(x, pos)
    h = x
    for layer in layers:
        h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
    assert calls == [x.shape] and torch.equal(h, x * 3.0)
    # a tensor that is not the replayed output reaching layer 1 runs that layer
    other = torch.randn(1, 7, 64)
    monkeypatch.setattr(manager, "_ineligible", lambda *a: "")
    eager = layers[1](other, attention_mask=None, position_ids=pos, position_embeddings=rope)
    assert not torch.equal(eager, other) and eager.shape == other.shape


def test_key_tracks_what_the_recorded_kernels_read():
    """The capture key changes with everything a replay would otherwise get wrong (the adapters' state, which weights
    train, a weight moved, training flags), and calls the graphs cannot stand for name their reason."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama", num_hidden_layers=2),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    litespark_hf.apply(model, cuda_graphs=True)
    manager = G.manager_of(model)
    x, cos = torch.randn(1, 9, 64), torch.randn(1, 9, 16)

    def key():
        k, params, _, why, _ = manager._key(manager._modules(), x, cos, 128)
        assert why is None
        return k, params

    base, params = key()
    assert params and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert {id(p) for p in params} == {id(p) for p in model.parameters() if p.requires_grad}
    assert key()[0] == base  # stable while nothing changes
    with model.disable_adapter():
        assert key()[0] != base
    assert key()[0] == base
    lora_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    lora_a.requires_grad_(False)
    assert key()[0] != base
    lora_a.requires_grad_(True)
    model.eval()
    assert key()[0] != base
    model.train()
    assert key()[0] == base
    norm = manager.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.data = norm.weight.data.clone()  # same values, another address
    assert key()[0] != base

    handle = manager.layers[1].mlp.register_forward_hook(lambda *a: None)
    assert manager._key(manager._modules(), x, cos, 128)[3] == "module hooks"
    handle.remove()
    manager.layers[0].self_attn.attention_dropout = 0.1
    assert manager._key(manager._modules(), x, cos, 128)[3] == "dropout"


def test_not_installed_with_compiled_layers():
    model = tiny_model("llama", num_hidden_layers=2)
    litespark_hf.apply(model, cuda_graphs=True, compile_layers=True)
    assert G.manager_of(model) is None
    litespark_hf.apply(model, cuda_graphs=True, compile_layers=False)
    assert G.manager_of(model) is not None


def test_gradient_buffers_are_shared_and_fused_groups_are_row_blocks_of_one():
    """The buffers the backward graphs write: one per trainable weight, the same for every bucket; a fused
    projection group's weights get row blocks of one buffer (the destination of its weight-gradient GEMM)."""
    model = tiny_model("llama", num_hidden_layers=2)
    litespark_hf.apply(model, cuda_graphs=True)
    manager = G.manager_of(model)
    modules = manager._modules()
    params = [p for m in modules for p in m._parameters.values() if p is not None and p.requires_grad]
    dests = manager._group_buffers(modules, params)
    attn, mlp = manager.layers[0].self_attn, manager.layers[0].mlp
    qkv = dests[tuple(id(m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj))]
    assert qkv.shape == (sum(m.weight.shape[0] for m in (attn.q_proj, attn.k_proj, attn.v_proj)), 64)
    assert tuple(id(m.weight) for m in (mlp.gate_proj, mlp.up_proj)) in dests
    buffers = [manager._grad_buffer(p) for p in params]
    assert all(b.shape == p.shape and b.dtype == p.dtype for b, p in zip(buffers, params))
    k = next(i for i, p in enumerate(params) if p is attn.k_proj.weight)
    assert buffers[k].data_ptr() == qkv[attn.q_proj.weight.shape[0]:].data_ptr()  # a row block of the group's
    norm = next(i for i, p in enumerate(params) if p is manager.layers[0].input_layernorm.weight)
    assert buffers[norm].data_ptr() not in {d.data_ptr() for d in dests.values()}
    # a second capture (another bucket) gets the very same buffers
    again = manager._group_buffers(modules, params)
    assert all(again[key] is dests[key] for key in dests)
    assert all(manager._grad_buffer(p) is b for p, b in zip(params, buffers))
