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

Gradient checkpointing's recomputed forward is NOT counted (that is "model" FLOPs, not hardware FLOPs), and LoRA is
charged the full ``6 N`` (the convention; frozen weights skip their weight gradient, about a third of it).

MFU = achieved FLOP/s / (peak FLOP/s per device * devices). The peak table holds dense (no sparsity) bf16 tensor-core
figures from the vendors' datasheets; override it with ``peak_tflops=`` or ``LITESPARK_PEAK_TFLOPS``.
"""

from __future__ import annotations

import os
import re

__all__ = [
    "PEAK_BF16_TFLOPS", "attention_flops_coefficient", "flops_per_token", "mfu", "num_parameters",
    "num_parameters_from_config", "peak_flops", "model_shape",
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


def flops_per_token(config, seq_len: int, num_params: int | None = None) -> int:
    """``6 N + 12 L d T`` training FLOPs per token for sequences of ``seq_len`` tokens.

    ``num_params`` defaults to `num_parameters_from_config` (pass `num_parameters(model)` for an exact count).
    """
    n = num_parameters_from_config(config) if num_params is None else int(num_params)
    return 6 * n + attention_flops_coefficient(config) * int(seq_len)


def mfu(flops_per_second: float, peak_flops_per_device: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation as a fraction (0..1); None without a peak."""
    if not peak_flops_per_device:
        return None
    return flops_per_second / (peak_flops_per_device * max(1, devices))
