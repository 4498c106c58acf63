"""Tiny random configs of the five supported families, shared by the tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 128

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
)

FAMILY_CONFIGS = {
    "llama": dict(rms_norm_eps=1e-6, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(sliding_window=8),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(head_dim=16, use_sliding_window=False),
    "starcoder2": dict(sliding_window=8, use_bias=True, attention_dropout=0.0, residual_dropout=0.0,
                       embedding_dropout=0.0, norm_epsilon=1e-5),
}
FAMILIES = tuple(FAMILY_CONFIGS)

# Dense families of issue #16 (tests/test_families_dense.py), each with its quirks on. Registered in FAMILY_CONFIGS
# (tiny_config / tiny_model take them) but not in FAMILIES: the suite-wide parametrized tests over FAMILIES also
# check code that does not know these families yet (the SAT mixins, the FLOP hand count).
DENSE_FAMILY_CONFIGS = {
    "phi3": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                 sliding_window=8, resid_pdrop=0.0, embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "smollm3": dict(num_hidden_layers=3, no_rope_layers=[1, 0, 1], use_sliding_window=True, sliding_window=8,
                    layer_types=["full_attention", "sliding_attention", "sliding_attention"], pad_token_id=0,
                    bos_token_id=1, eos_token_id=2),
    "olmo2": dict(pad_token_id=0, eos_token_id=2),
    "olmo3": dict(num_hidden_layers=3, sliding_window=8, pad_token_id=0, eos_token_id=2,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "granite": dict(embedding_multiplier=2.5, residual_multiplier=0.4, attention_multiplier=0.1, logits_scaling=3.0),
    "ministral": dict(head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
}
DENSE_FAMILIES = tuple(DENSE_FAMILY_CONFIGS)
FAMILY_CONFIGS.update(DENSE_FAMILY_CONFIGS)

# Mixture-of-experts families (tests/test_families_moe.py): 4 experts, top-2, the aux loss in the loss, quirks on.
# Registered in FAMILY_CONFIGS but not in FAMILIES, as the dense ones above.
_MOE = dict(num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.1)
MOE_FAMILY_CONFIGS = {
    "mixtral": dict(_MOE, num_local_experts=4, sliding_window=8),
    "qwen2_moe": dict(_MOE, num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                      norm_topk_prob=False, num_hidden_layers=3, mlp_only_layers=[1], use_sliding_window=True,
                      sliding_window=8, max_window_layers=1),
    "qwen3_moe": dict(_MOE, num_experts=4, moe_intermediate_size=48, norm_topk_prob=True, head_dim=16,
                      num_hidden_layers=3, mlp_only_layers=[1]),
    "gpt_oss": dict(_MOE, num_local_experts=4, head_dim=16, sliding_window=8, attention_bias=True,
                    layer_types=["sliding_attention", "full_attention"], pad_token_id=0, eos_token_id=2),
}
MOE_FAMILIES = tuple(MOE_FAMILY_CONFIGS)
FAMILY_CONFIGS.update(MOE_FAMILY_CONFIGS)


def tiny_config(family: str, **overrides):
    kwargs = {**COMMON, **FAMILY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def tiny_model(family: str, seed: int = 0, attn_implementation: str = "eager", dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), attn_implementation=attn_implementation)
    return model.to(dtype)


def random_batch(batch: int = 2, seq: int = 24, seed: int = 1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    return ids.to(device)


def tiny_tokenizer():
    """A word-level tokenizer over the tiny vocabulary ("t0" ... "t127"), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3")


class OpLog:
    """Context manager recording every aten op that runs inside it (``counts``: op name -> calls), e.g. to assert
    that a path never builds a dense gradient or never reads a device value on the host (``_local_scalar_dense``)."""

    def __init__(self):
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        log = self
        self.counts = Counter()

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                log.counts[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()

    @property
    def seen(self) -> set[str]:
        return set(self.counts)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def attention_inputs(B, Hq, Hkv, Sq, Skv, D, dtype, seed=0, q_gain=1.0):
    """Random q [B, Hq, Sq, D] (times ``q_gain``), k, v [B, Hkv, Skv, D] (requiring grad) and an output gradient
    [B, Sq, Hq, D] for the attention kernel tests (CPU generator, then ``dtype``)."""
    g = torch.Generator().manual_seed(seed)
    q = (q_gain * torch.randn(B, Hq, Sq, D, generator=g)).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, Skv, D, generator=g).to(dtype).requires_grad_()
    do = torch.randn(B, Sq, Hq, D, generator=g).to(dtype)
    return q, k, v, do


def layer_output_and_grads(layer, hidden, position_ids, position_embeddings, seed: int) -> list[torch.Tensor]:
    """One decoder layer's [output, d_hidden, *parameter gradients] under the loss sum(output * noise) (fp32,
    noise from a CPU generator seeded with ``seed``)."""
    hidden = hidden.detach().clone().requires_grad_()
    out = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
    out = out[0] if isinstance(out, tuple) else out
    noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    grads = torch.autograd.grad((out.float() * noise).sum(), [hidden, *layer.parameters()])
    return [out.detach(), *grads]


def assert_matches_stock(stock, lit, inputs: dict, valid: torch.Tensor, tol: float = 1e-4) -> None:
    """fp32: logits at the ``valid`` positions (eval, ``use_cache=False``), the training loss and every parameter's
    gradient of ``lit`` equal ``stock``'s within ``tol`` (relative; the loss within 1e-5)."""
    no_labels = {**{k: v for k, v in inputs.items() if k != "labels"}, "use_cache": False}
    stock.eval(), lit.eval()
    with torch.no_grad():
        a, b = stock(**no_labels).logits, lit(**no_labels).logits
    assert rel_err(b[valid], a[valid]) <= tol
    stock.train(), lit.train()
    loss_a, loss_b = stock(**inputs).loss, lit(**inputs).loss
    assert abs(loss_a.item() - loss_b.item()) <= 1e-5 * abs(loss_a.item())
    loss_a.backward()
    loss_b.backward()
    n = 0
    for (name, pa), (_, pb) in zip(stock.named_parameters(), lit.named_parameters()):
        assert pa.grad is not None and pb.grad is not None, name
        assert rel_err(pb.grad, pa.grad) <= tol, name
        n += 1
    assert n == len(list(stock.parameters()))


def assert_grads_match(stock, lit, tol: float = 1e-4) -> None:
    """Every trainable parameter's gradient of ``lit`` equals ``stock``'s within ``tol`` (relative)."""
    n = 0
    for (name, pa), (name_b, pb) in zip(stock.named_parameters(), lit.named_parameters()):
        assert name == name_b
        if not pa.requires_grad:
            continue
        assert pa.grad is not None and pb.grad is not None, name
        assert rel_err(pb.grad, pa.grad) <= tol, (name, rel_err(pb.grad, pa.grad))
        n += 1
    assert n > 0


def train_side_by_side(models, batches, steps: int = 20, lr: float = 3e-3) -> list[list[float]]:
    """``steps`` AdamW steps of each model on ``batches[step % len(batches)]``, the models in turn at each step;
    returns the losses, one list (one loss per model) per step."""
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in models]
    history = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        losses = []
        for model, opt in zip(models, opts):
            model.train()
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        history.append(losses)
    return history


def alternating_padded_batches(mask: torch.Tensor, labels_fn, low: int = 0, high: int = 128, seed: int = 11):
    """Two batches of random ids in ``[low, high)`` over one padding ``mask``, labels from ``labels_fn(ids, mask)``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        ids = torch.randint(low, high, mask.shape, generator=g)
        out.append(dict(input_ids=ids, attention_mask=mask, labels=labels_fn(ids, mask)))
    return out


def saved_bytes(call, exclude=frozenset()) -> int:
    """Bytes of the distinct storages autograd saves for the backward while ``call()`` runs (a saved-tensor hook;
    storages whose ``data_ptr`` is in ``exclude``, e.g. the parameters, not counted)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if t.numel() and st.data_ptr() not in exclude:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        call()
    return sum(seen.values())


def record_training_steps(trainer, after_step=None) -> list[dict]:
    """Wrap a Trainer's ``training_step`` (``after_step(loss, inputs)`` after each, with the batch it trained on) and
    its ``_clip_grad_norm``: returns the list that receives, at every optimizer step, the gradients of every trainable
    parameter before clipping (Litespark folds the clip into the optimizer step, so they are read just before it)."""
    import torch

    grads: list[dict] = []
    step, clip = trainer.training_step, trainer._clip_grad_norm

    def training_step(model, inputs, *a, **k):
        batch = {key: v.clone() for key, v in inputs.items() if torch.is_tensor(v)}
        loss = step(model, inputs, *a, **k)
        if after_step is not None:
            after_step(loss, batch)
        return loss

    def clip_grad_norm(model):
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters()
                      if p.requires_grad and p.grad is not None})
        return clip(model)

    trainer.training_step, trainer._clip_grad_norm = training_step, clip_grad_norm
    return grads
