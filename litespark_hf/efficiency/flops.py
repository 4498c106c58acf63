"""Training FLOPs per token, model FLOPs utilisation (MFU) and the accelerators' peak FLOP/s.

The formula (PaLM, appendix B; nanoGPT's ``estimate_mfu``), for a decoder-only transformer trained on sequences of
``T`` tokens::

    FLOPs per token = 6 * N + 12 * L * d * T

- ``N``: the number of parameters, each tensor counted once (tied input/output embeddings are ONE matrix; the
  embedding counts because, tied or not, the LM head is a matmul of that size). ``6 N``: forward 2 N, backward 4 N.
- ``L``: ``config.num_hidden_layers``; ``d = num_attention_heads * head_dim`` (``head_dim`` from the config, else
  ``hidden_size // num_attention_heads``); ``T``: the sequence length a token attends over. ``12 L d T``: the
  attention scores ``Q K^T`` and ``P V`` (2 matmuls x 2 FLOPs x 3 for forward + backward), counted as non-causal
  (every token attends to all ``T``), as PaLM and nanoGPT do.

For a batch of sequences of unequal lengths ``n_i`` (padding, packing) the attention term is summed exactly:
``12 L d * sum_i n_i^2``, so a padded or packed batch is charged for its real tokens only.

Mixture-of-experts models (mixtral, qwen2_moe, qwen3_moe, gpt_oss): ``N`` is the ACTIVE parameter count, what one
token runs through: the routed experts count ``top_k`` of ``E`` per MoE layer (`inactive_expert_parameters` is
subtracted from the given or counted total); the router, shared experts and dense layers count in full.

Gradient checkpointing's recomputed forward is NOT counted (that is "model" FLOPs, not hardware FLOPs), and LoRA is
charged the full ``6 N`` (the convention; frozen weights skip their weight gradient, about a third of it).

`post_training_step_flops` is the mode-aware count of one SFT/DPO step (the post-training benchmark's MFU): LoRA
without the frozen weights' weight gradient but with the adapters, DPO with its reference forward, the LM head over
the positions that are scored; see its docstring.

MFU = achieved FLOP/s / (peak FLOP/s per device * devices). The peak table holds dense (no sparsity) bf16 tensor-core
figures from the vendors' datasheets; override it with ``peak_tflops=`` or ``LITESPARK_PEAK_TFLOPS``.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "PEAK_BF16_TFLOPS", "attention_flops_coefficient", "flops_per_token", "mfu", "num_parameters",
    "num_parameters_from_config", "peak_flops", "model_shape", "lm_head_parameters", "lora_parameters",
    "post_training_step_flops", "inactive_expert_parameters", "num_active_parameters",
]

# (regular expression on the lower-cased device name, dense bf16 TFLOP/s per device, label). First match wins, so
# the specific names come before the general ones. Sources: NVIDIA/AMD datasheets (dense = half the "with sparsity"
# figure). V100 and T4 have no bf16: their fp16 tensor-core peak is given.
PEAK_BF16_TFLOPS: list[tuple[str, float, str]] = [
    (r"gb200", 2500.0, "NVIDIA GB200 (per GPU)"),
    (r"b200", 2250.0, "NVIDIA B200"),
    (r"b100", 1750.0, "NVIDIA B100"),
    (r"gh200", 989.0, "NVIDIA GH200"),
    (r"h200.*nvl|nvl.*h200", 835.0, "NVIDIA H200 NVL"),
    (r"h200", 989.0, "NVIDIA H200 SXM"),
    (r"h100.*nvl|nvl.*h100", 835.0, "NVIDIA H100 NVL"),
    (r"h100.*pcie|pcie.*h100", 756.0, "NVIDIA H100 PCIe"),
    (r"h100", 989.0, "NVIDIA H100 SXM"),
    (r"h800", 989.0, "NVIDIA H800"),
    (r"\bh20\b", 148.0, "NVIDIA H20"),
    (r"a100|a800", 312.0, "NVIDIA A100/A800"),
    (r"l40s", 362.0, "NVIDIA L40S"),
    (r"\bl40\b", 181.0, "NVIDIA L40"),
    (r"\bl4\b", 121.0, "NVIDIA L4"),
    (r"\ba10g\b", 70.0, "NVIDIA A10G"),
    (r"\ba10\b", 125.0, "NVIDIA A10"),
    (r"\ba30\b", 165.0, "NVIDIA A30"),
    (r"\ba40\b", 149.7, "NVIDIA A40"),
    (r"rtx 6000 ada", 364.2, "NVIDIA RTX 6000 Ada"),
    (r"rtx a6000", 154.8, "NVIDIA RTX A6000"),
    (r"rtx 5090", 209.5, "NVIDIA GeForce RTX 5090"),
    (r"rtx 4090", 165.2, "NVIDIA GeForce RTX 4090"),
    (r"rtx 3090", 71.0, "NVIDIA GeForce RTX 3090"),
    (r"v100", 125.0, "NVIDIA V100 (fp16)"),
    (r"\bt4\b", 65.0, "NVIDIA T4 (fp16)"),
    (r"mi325x|mi300x", 1307.4, "AMD Instinct MI300X/MI325X"),
    (r"mi250x", 383.0, "AMD Instinct MI250X"),
    (r"mi250", 362.1, "AMD Instinct MI250"),
]


def peak_flops(device_name: str | None = None, override_tflops: float | None = None) -> tuple[float | None, str]:
    """Dense bf16 peak FLOP/s of one device and where the figure comes from.

    Order: ``override_tflops`` (argument), the ``LITESPARK_PEAK_TFLOPS`` environment variable, the table above
    (matched on ``device_name``, by default ``torch.cuda.get_device_name()``). Returns ``(None, reason)`` when
    unknown (CPU, an unlisted accelerator): MFU is then not reported.
    """
    if override_tflops is not None:
        return float(override_tflops) * 1e12, f"given: {float(override_tflops):g} TFLOP/s"
    env = os.environ.get("LITESPARK_PEAK_TFLOPS")
    if env:
        try:
            return float(env) * 1e12, f"LITESPARK_PEAK_TFLOPS={env}"
        except ValueError:
            pass
    if device_name is None:
        try:
            import torch

            if not torch.cuda.is_available():
                return None, "no CUDA device (set LITESPARK_PEAK_TFLOPS to get an MFU)"
            device_name = torch.cuda.get_device_name()
        except Exception:  # noqa: BLE001 - a missing driver must not stop anything
            return None, "device name unavailable"
    name = device_name.lower()
    for pattern, tflops, label in PEAK_BF16_TFLOPS:
        if re.search(pattern, name):
            return tflops * 1e12, f"{label}: {tflops:g} TFLOP/s dense bf16 (datasheet)"
    return None, f"{device_name!r} not in the peak table (set LITESPARK_PEAK_TFLOPS)"


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def model_shape(config) -> tuple[int, int]:
    """``(L, d)`` of the formula from a transformers config: layers and ``num_attention_heads * head_dim``."""
    cfg = _text_config(config)
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return layers, heads * int(head_dim)


def attention_flops_coefficient(config) -> int:
    """``12 * L * d``: multiply by ``sum_i n_i^2`` (sequence lengths) for a batch's attention-score FLOPs."""
    layers, d = model_shape(config)
    return 12 * layers * d


def num_parameters(model) -> int:
    """Parameters of a model, each tensor once (``model.parameters()`` already skips a tied weight's repeat)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        # ZeRO-3 / FSDP1 flat params keep the full size in ds_numel / _unpadded_unsharded_size
        total += int(getattr(p, "ds_numel", 0) or p.numel())
    return total


def num_parameters_from_config(config) -> int:
    """Hand count of ``N`` for the Llama-style (llama, mistral, qwen2, qwen3) and StarCoder2 configs.

    Embedding ``V h`` (+ an untied LM head ``V h``); per layer q ``h Hq D``, k and v ``h Hkv D``, o ``Hq D h`` (+
    biases), MLP ``3 h I`` (gated) or ``2 h I + I + h`` (StarCoder2, with bias), norms; the final norm.
    Raises ValueError for other model types (use `num_parameters` on the model).
    """
    cfg = _text_config(config)
    mt = cfg.model_type
    h, inter, vocab = int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.vocab_size)
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    dh = int(getattr(cfg, "head_dim", None) or h // hq)
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(getattr(cfg, "attention_bias", False))
        mlp_bias = bool(getattr(cfg, "mlp_bias", False))
        attn = h * hq * dh + 2 * h * hkv * dh + hq * dh * h
        attn += (hq * dh + 2 * hkv * dh) * qkv_bias + h * o_bias
        mlp = 3 * h * inter + (2 * inter + h) * mlp_bias
        norms = 2 * h + (2 * dh if mt == "qwen3" else 0)  # qwen3: q_norm and k_norm over head_dim
        final_norm = h
    elif mt == "starcoder2":
        bias = bool(getattr(cfg, "use_bias", True))
        attn = h * hq * dh + 2 * h * hkv * dh + hq * dh * h + (hq * dh + 2 * hkv * dh + h) * bias
        mlp = 2 * h * inter + (inter + h) * bias
        norms = 2 * 2 * h  # two LayerNorms with bias
        final_norm = 2 * h
    else:
        raise ValueError(f"no hand count for model_type {mt!r}: count the model's parameters instead")
    embed = vocab * h * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    return embed + int(cfg.num_hidden_layers) * (attn + mlp + norms) + final_norm


# MoE families: (attribute of the expert count, of the expert MLP width, parameters of one expert as a function of
# (hidden, width)). Expert count and width are read from the config; the layers that are MoE by `_moe_layers`.
_MOE_EXPERTS = {
    "mixtral": ("num_local_experts", "intermediate_size", lambda h, i: 3 * h * i),
    "qwen2_moe": ("num_experts", "moe_intermediate_size", lambda h, i: 3 * h * i),
    "qwen3_moe": ("num_experts", "moe_intermediate_size", lambda h, i: 3 * h * i),
    "gpt_oss": ("num_local_experts", "intermediate_size", lambda h, i: 3 * h * i + 2 * i + h),  # + the biases
}


def _moe_layers(cfg) -> int:
    """How many decoder layers have routed experts (Qwen-MoE: not in ``mlp_only_layers``, every
    ``decoder_sparse_step``-th)."""
    layers = int(cfg.num_hidden_layers)
    if cfg.model_type not in ("qwen2_moe", "qwen3_moe"):
        return layers
    dense = set(getattr(cfg, "mlp_only_layers", None) or ())
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    return sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0)


def inactive_expert_parameters(config) -> int:
    """Routed-expert parameters a token does NOT run through: ``moe_layers * (E - top_k) * per_expert`` (0 for a
    dense model)."""
    cfg = _text_config(config)
    spec = _MOE_EXPERTS.get(getattr(cfg, "model_type", None))
    if spec is None:
        return 0
    count_attr, width_attr, per_expert = spec
    experts = int(getattr(cfg, count_attr))
    if experts <= 0:
        return 0
    top_k = int(cfg.num_experts_per_tok)
    return _moe_layers(cfg) * (experts - top_k) * per_expert(int(cfg.hidden_size), int(getattr(cfg, width_attr)))


def num_active_parameters(model) -> int:
    """`num_parameters` less the routed experts a token skips (`inactive_expert_parameters`): the ``N`` of the
    FLOP formula for MoE models; equal to `num_parameters` for dense ones."""
    return num_parameters(model) - inactive_expert_parameters(getattr(model, "config", None))


def flops_per_token(config, seq_len: int, num_params: int | None = None) -> int:
    """``6 N + 12 L d T`` training FLOPs per token for sequences of ``seq_len`` tokens.

    ``num_params`` (ALL parameters) defaults to `num_parameters_from_config` (pass `num_parameters(model)` for an
    exact count); for MoE models the experts a token skips are subtracted (`inactive_expert_parameters`).
    """
    n = num_parameters_from_config(config) if num_params is None else int(num_params)
    n -= inactive_expert_parameters(config)
    return 6 * n + attention_flops_coefficient(config) * int(seq_len)


def mfu(flops_per_second: float, peak_flops_per_device: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation as a fraction (0..1); None without a peak."""
    if not peak_flops_per_device:
        return None
    return flops_per_second / (peak_flops_per_device * max(1, devices))


# ---------------------------------------------------------------------------------------------------------------------
# Post-training (SFT / DPO, full or LoRA): FLOPs of one optimizer step, counted by what the step executes.


def lm_head_parameters(config) -> int:
    """``V * h``: the LM head matrix (the input embedding's matrix too when tied)."""
    cfg = _text_config(config)
    return int(cfg.vocab_size) * int(cfg.hidden_size)


# Linear layers that peft's ``target_modules="all-linear"`` adapts (every nn.Linear but the output layer), per
# decoder layer: name -> (in_features, out_features) as functions of (h, I, Hq*D, Hkv*D).
_ALL_LINEAR = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "starcoder2": ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"),
}
_ALL_LINEAR.update(mistral=_ALL_LINEAR["llama"], qwen2=_ALL_LINEAR["llama"], qwen3=_ALL_LINEAR["llama"])


def lora_parameters(config, r: int, target_modules="all-linear") -> int:
    """Parameters of LoRA adapters of rank ``r``: ``r * (in + out)`` per adapted linear layer, over all layers.

    ``target_modules``: ``"all-linear"`` (peft's: every linear layer of the decoder layers, not the LM head) or a list
    of projection names (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``gate_proj``, ``up_proj``, ``down_proj``;
    StarCoder2: ``c_fc``, ``c_proj``). Llama-style and StarCoder2 configs.
    """
    cfg = _text_config(config)
    mt = cfg.model_type
    if mt not in _ALL_LINEAR:
        raise ValueError(f"no LoRA count for model_type {mt!r}: count the adapters' parameters instead")
    h, inter = int(cfg.hidden_size), int(cfg.intermediate_size)
    hq = int(cfg.num_attention_heads)
    hkv = int(getattr(cfg, "num_key_value_heads", None) or hq)
    dh = int(getattr(cfg, "head_dim", None) or h // hq)
    shapes = {"q_proj": (h, hq * dh), "k_proj": (h, hkv * dh), "v_proj": (h, hkv * dh), "o_proj": (hq * dh, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h),
              "c_fc": (h, inter), "c_proj": (inter, h)}
    names = _ALL_LINEAR[mt] if target_modules == "all-linear" else tuple(target_modules)
    unknown = [n for n in names if n not in _ALL_LINEAR[mt]]
    if unknown:
        raise ValueError(f"unknown target modules {unknown} for {mt!r}; choose from {_ALL_LINEAR[mt]}")
    per_layer = sum(r * (shapes[n][0] + shapes[n][1]) for n in names)
    return int(cfg.num_hidden_layers) * per_layer


def post_training_step_flops(config, seq_lens, head_tokens: int, *, num_params: int | None = None,
                             lora_params: int = 0, reference_forward: bool = False) -> dict:
    """Model FLOPs of one post-training step (SFT or DPO, full fine-tuning or LoRA), counting what the step runs.

    Convention (PaLM appendix B / Megatron's accounting of matmul FLOPs, made mode-aware): a weight matrix costs
    2 FLOPs per token in the forward (multiply + add), 2 per token for the input gradient and 2 per token for the
    weight gradient. So, with ``T = sum(seq_lens)`` real tokens, ``S2 = sum(n_i^2)``, ``H = head_tokens``:

    - ``N_layers``: every ACTIVE parameter (MoE: top-k of the routed experts) but the embedding and LM head matrices (``num_params - V h``, ``- 2 V h`` when
      untied; ``num_params`` defaults to `num_parameters_from_config`); ``V h``: the LM head matrix. The input
      embedding is a lookup (no FLOPs; its gradient is a scatter, not counted).
    - forward: ``2 N_layers T + 2 P_lora T + 4 L d S2 + 2 V h H``. Attention scores ``Q K^T`` and ``P V`` over
      each sequence's real length (non-causal, as PaLM / nanoGPT: ``4 L d n^2`` forward, ``8 L d n^2`` backward; a
      packed or padding-free batch is charged per document, a padded one per row's real tokens only).
    - the LM head over the ``H`` positions whose next-token label is not -100 (completion tokens), the ones TRL's
      fused LM head projects on CUDA (on CPU it scores every position; the formula still counts ``H``, the useful ones).
    - backward, input gradient: ``2 N_layers T + 2 P_lora T + 8 L d S2 + 2 V h H``, through every decoder layer (all
      modes here train something in the first layer: full fine-tuning trains the embedding, LoRA ``all-linear`` adapts
      layer 0, and PEFT with gradient checkpointing makes the embedding output require grad).
    - backward, weight gradient: ``2`` per TRAINABLE weight per token: full fine-tuning (``lora_params == 0``)
      ``2 N_layers T + 2 V h H`` (the tied LM head/embedding matrix gets its gradient from the head's ``H``
      positions); LoRA ``2 P_lora T`` only (frozen base weights and LM head get none).
    - ``reference_forward`` (DPO): the reference model's forward over the same tokens, ``2 N_layers T + 4 L d S2 +
      2 V h H`` (a frozen copy, or the same model with its adapters disabled: no adapter FLOPs either way).
    - gradient checkpointing's recomputed forward is NOT counted (model FLOPs, not hardware FLOPs); norms,
      activations, RoPE, softmax and the optimizer are not counted either (norm weights sit in ``N_layers``).

    For full SFT with ``H = T`` this is ``(6 N + 12 L d T) T``, the `flops_per_token` convention, for tied embeddings.
    ``seq_lens``: real lengths of the sequences of the trained forward (DPO: chosen and rejected rows). Returns a dict
    of ints: ``forward``, ``backward_input``, ``backward_weight``, ``reference_forward``, ``total`` (and ``tokens``,
    ``head_tokens``, ``sum_sq_lengths``, ``layer_params``, ``lm_head_params``, ``lora_params``).
    """
    cfg = _text_config(config)
    lens = [int(n) for n in seq_lens]
    t = sum(lens)
    s2 = sum(n * n for n in lens)
    h = int(head_tokens)
    n_all = num_parameters_from_config(config) if num_params is None else int(num_params)
    n_all -= inactive_expert_parameters(config)  # MoE: the routed experts a token runs through only
    vh = lm_head_parameters(config)
    n_layers = n_all - vh * (1 if getattr(cfg, "tie_word_embeddings", False) else 2)
    layers, d = model_shape(config)
    p = int(lora_params)
    attn_fwd = 4 * layers * d * s2
    fwd = 2 * n_layers * t + 2 * p * t + attn_fwd + 2 * vh * h
    bwd_in = 2 * n_layers * t + 2 * p * t + 2 * attn_fwd + 2 * vh * h
    bwd_w = 2 * p * t if p else 2 * n_layers * t + 2 * vh * h
    ref = 2 * n_layers * t + attn_fwd + 2 * vh * h if reference_forward else 0
    return {"forward": fwd, "backward_input": bwd_in, "backward_weight": bwd_w, "reference_forward": ref,
            "total": fwd + bwd_in + bwd_w + ref, "tokens": t, "head_tokens": h, "sum_sq_lengths": s2,
            "layer_params": n_layers, "lm_head_params": vh, "lora_params": p}
