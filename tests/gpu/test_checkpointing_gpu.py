"""GPU checks of ``checkpoint_layers="auto"`` (litespark_hf/checkpointing.py; run with ``pytest -m gpu``).

- The per-token bound and the weight copy against what a Llama-3.2-1B-shaped Litespark layer saves under bf16
  autocast with the Triton kernels (fp32 weights, 2 x 1024 tokens): measured <= bound.
- A 6-layer model with gradient checkpointing on: with ``auto`` the planner keeps some layers unchecked on this
  GPU, the step's peak memory stays under the planner's estimate, and the losses and gradients match
  ``checkpoint_layers="all"`` within bf16 tolerance over 3 AdamW steps.
"""

import copy

import pytest
import torch

import litespark_hf
from litespark_hf import checkpointing as C
from tiny_models import saved_bytes

pytestmark = pytest.mark.gpu


def _llama(layers, hidden=2048, inter=8192, vocab=8192):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=8,
                               max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").cuda()


def test_bound_covers_the_bf16_layer():
    model = _llama(2)
    litespark_hf.apply(model)
    model.train()
    ids = torch.randint(0, 8192, (2, 1024), device="cuda")
    layer = model.model.layers[-1]
    cap = {}
    h = layer.register_forward_pre_hook(lambda m, a, k: cap.update(a=a, k=k), with_kwargs=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids)
    h.remove()
    args = tuple(a.detach().requires_grad_(True) if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in cap["a"])
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def call():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            layer(*args, **cap["k"])

    saved = saved_bytes(call, params)
    bound = C.activation_bytes_per_token(model.config) * ids.numel() + C.layer_weight_bytes(layer)
    print(f"saved {saved / 2 ** 20:.1f} MiB, bound {bound / 2 ** 20:.1f} MiB ({saved / bound:.2f})")
    assert 0 < saved <= bound


def _run(model, steps, ids):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    losses, peaks = [], []
    for _ in range(steps):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        peaks.append(torch.cuda.max_memory_allocated())
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads, peaks


def test_auto_keeps_layers_and_matches_full_checkpointing():
    base = _llama(6, hidden=1024, inter=4096)
    ids = torch.randint(0, 8192, (4, 1024), device="cuda")
    out = {}
    for mode in ("all", "auto"):
        model = copy.deepcopy(base)
        litespark_hf.apply(model, checkpoint_layers=mode)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        out[mode] = _run(model, 3, ids)
        if mode == "auto":
            planner = model.__dict__[C._STATE][0]
            recomputed, estimate = planner.recomputed, planner.estimate
        del model
    free, _ = torch.cuda.mem_get_info()
    if free > 40 * 2 ** 30:  # this small model fits many times over: every layer keeps its activations
        assert recomputed == 0
    assert max(out["auto"][2]) <= estimate
    (l0, g0, _), (l1, g1, _) = out["all"], out["auto"]
    for a, b in zip(l0, l1):
        assert abs(a - b) <= 1e-3 * abs(a)
    for k in g0:
        err = ((g1[k] - g0[k]).norm() / g0[k].norm().clamp_min(1e-12)).item()
        assert err < 2e-2, (k, err)
