"""The architecture table: ``config.model_type`` -> which Hugging Face classes Litespark swaps, and for what.

One row per supported family. Each row names the modeling module and, per class, the Litespark mixin that replaces
it (`litespark_hf.modules`). Swap kinds are grouped by the `LitesparkConfig` switch that turns them on or off.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch.nn as nn

from . import modules as M

# Swap kinds -> (the LitesparkConfig switch that enables them, the mixin)
SWAP_KINDS: dict[str, tuple[str, type]] = {
    "rms_norm": ("norms", M.LitesparkRMSNorm),
    "decoder_layer": ("norms", M.LitesparkDecoderLayer),  # residual add fused into the post-attention RMSNorm
    "layer_norm": ("norms", M.LitesparkLayerNorm),
    "gated_mlp": ("mlp", M.LitesparkGatedMLP),
    "gelu_mlp": ("mlp", M.LitesparkGeluMLP),
    "attention": ("rope", M.LitesparkAttention),  # no sliding window (Llama)
    "attention_config_window": ("rope", M.LitesparkConfigWindowAttention),  # window = config.sliding_window
    "attention_layer_window": ("rope", M.LitesparkLayerWindowAttention),  # window = module.sliding_window
    "causal_lm": ("fused_cross_entropy", M.LitesparkCausalLM),
    # Gemma2 / Gemma3 (litespark_hf/modules/gemma.py)
    "gemma_rms_norm": ("norms", M.LitesparkGemmaRMSNorm),  # x_hat * (1 + weight) in fp32
    "gemma_decoder_layer": ("norms", M.LitesparkGemmaDecoderLayer),  # sandwich norms: adds fused into the next norm
    "gemma2_attention": ("rope", M.LitesparkGemma2Attention),  # + softcap, window = module.sliding_window
    "scaled_embedding": ("fused_cross_entropy", M.LitesparkScaledEmbedding),  # tied to the LM head: in-place grad
    "gemma3_multimodal_model": ("attention", M.LitesparkGemma3Model),  # image batches: transformers' masks, padded
    "gemma3_text_model": ("attention", M.LitesparkGemma3TextModel),  # bidirectional: padded batches stay padded
    # dense families (litespark_hf/modules/families.py)
    "olmo_rms_norm": ("norms", M.LitesparkOlmoRMSNorm),  # weight applied before the rounding to the input dtype
    "decoder_layer_dropout": ("norms", M.LitesparkPhi3DecoderLayer),  # + residual dropout on each branch
    "decoder_layer_scaled": ("norms", M.LitesparkGraniteDecoderLayer),  # + branch * residual_multiplier
    "packed_gated_mlp": ("mlp", M.LitesparkPackedGatedMLP),  # one gate_up_proj
    "attention_packed_qkv": ("rope", M.LitesparkPackedQKVAttention),  # one qkv_proj, partial RoPE, config window
    "attention_no_rope_layers": ("rope", M.LitesparkNoRopeAttention),  # no RoPE where use_rope is off
    "attention_projection_norm": ("rope", M.LitesparkProjectionNormAttention),  # q/k norm over the projection
    "causal_lm_scaled_logits": ("fused_cross_entropy", M.LitesparkScaledLogitsCausalLM),  # logits / logits_scaling
    # mixture-of-experts families (litespark_hf/modules/moe.py)
    "moe_experts": ("mlp", M.LitesparkExperts),  # sorted once, one grouped GEMM per projection for all experts
    "moe_model": ("attention", M.LitesparkMoeModel),  # router logits of an unpadded batch back in the padded rows
    "moe_causal_lm": ("fused_cross_entropy", M.LitesparkMoeCausalLM),  # + router_aux_loss_coef * aux_loss
    "attention_sinks": ("rope", M.LitesparkSinkAttention),  # GPT-OSS: sinks (reference attention), half-width RoPE
}


@dataclass(frozen=True)
class Architecture:
    """A supported family: its modeling module and ``{class name: swap kind}``."""

    model_type: str
    modeling_module: str
    swaps: dict[str, str]
    notes: str = ""

    def resolve(self) -> dict[type, str]:
        """``{class: swap kind}``, importing the modeling module (classes named ``nn.*`` come from torch)."""
        module = importlib.import_module(self.modeling_module)
        resolved = {}
        for name, kind in self.swaps.items():
            cls = getattr(nn, name.removeprefix("nn.")) if name.startswith("nn.") else getattr(module, name)
            resolved[cls] = kind
        return resolved


def _gated_family(model_type: str, prefix: str, notes: str = "", attention: str = "attention") -> Architecture:
    return Architecture(
        model_type=model_type,
        modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
        swaps={
            f"{prefix}RMSNorm": "rms_norm",
            f"{prefix}DecoderLayer": "decoder_layer",
            f"{prefix}MLP": "gated_mlp",
            f"{prefix}Attention": attention,
            f"{prefix}ForCausalLM": "causal_lm",
        },
        notes=notes,
    )


ARCHITECTURES: dict[str, Architecture] = {
    "llama": _gated_family("llama", "Llama", "RMSNorm, gated SiLU MLP, RoPE (Llama-3 scaling folded into cos/sin)"),
    "mistral": _gated_family("mistral", "Mistral", "as Llama, plus sliding-window attention",
                             attention="attention_config_window"),
    "qwen2": _gated_family("qwen2", "Qwen2", "as Llama, q/k/v bias, optional sliding window per layer",
                           attention="attention_layer_window"),
    "qwen3": _gated_family("qwen3", "Qwen3", "as Llama, plus per-head q/k RMSNorm, sliding window per layer",
                           attention="attention_layer_window"),
    "starcoder2": Architecture(
        model_type="starcoder2",
        modeling_module="transformers.models.starcoder2.modeling_starcoder2",
        swaps={
            "nn.LayerNorm": "layer_norm",
            "Starcoder2MLP": "gelu_mlp",
            "Starcoder2Attention": "attention_config_window",
            "Starcoder2ForCausalLM": "causal_lm",
        },
        notes="LayerNorm with bias, non-gated GELU-tanh MLP with bias, sliding window, attention/residual dropout",
    ),
    "ministral": _gated_family("ministral", "Ministral", "as Mistral, sliding window per layer (layer_types)",
                               attention="attention_layer_window"),
    "smollm3": _gated_family("smollm3", "SmolLM3", "as Llama, no RoPE on the no_rope_layers, sliding window per layer",
                             attention="attention_no_rope_layers"),
    "phi3": Architecture(
        model_type="phi3",
        modeling_module="transformers.models.phi3.modeling_phi3",
        swaps={
            "Phi3RMSNorm": "rms_norm",
            "Phi3DecoderLayer": "decoder_layer_dropout",
            "Phi3MLP": "packed_gated_mlp",
            "Phi3Attention": "attention_packed_qkv",
            "Phi3ForCausalLM": "causal_lm",
        },
        notes="fused qkv_proj and gate_up_proj, partial rotary, config sliding window, residual dropout",
    ),
    "granite": Architecture(
        model_type="granite",
        modeling_module="transformers.models.granite.modeling_granite",
        swaps={
            "GraniteRMSNorm": "rms_norm",
            "GraniteDecoderLayer": "decoder_layer_scaled",
            "GraniteMLP": "gated_mlp",
            "GraniteAttention": "attention",  # scaling = attention_multiplier (module attribute)
            "GraniteForCausalLM": "causal_lm_scaled_logits",
        },
        notes="as Llama, embedding/residual/attention multipliers, logits divided by logits_scaling",
    ),
    **{
        model_type: Architecture(
            model_type=model_type,
            modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
            swaps={
                f"{prefix}RMSNorm": "olmo_rms_norm",  # q/k norms, post-norms, final norm
                f"{prefix}MLP": "gated_mlp",
                f"{prefix}Attention": "attention_projection_norm",
                f"{prefix}ForCausalLM": "causal_lm",
            },  # the decoder layer is post-norm (norm of each branch's output, then the add): stock
            notes=notes,
        )
        for model_type, prefix, notes in (
            ("olmo2", "Olmo2", "post-norms, q/k RMSNorm over the whole projection"),
            ("olmo3", "Olmo3", "as OLMo-2, sliding window per layer (layer_types)"),
        )
    },
}



@dataclass(frozen=True)
class _OptionalSwapsArchitecture(Architecture):
    """An `Architecture` some of whose classes are missing from older transformers versions (swapped where
    present)."""

    optional: tuple[str, ...] = ()

    def resolve(self) -> dict[type, str]:
        module = importlib.import_module(self.modeling_module)
        swaps = {n: k for n, k in self.swaps.items() if n not in self.optional or hasattr(module, n)}
        return Architecture(self.model_type, self.modeling_module, swaps).resolve()


def _gemma_family(model_type: str, prefix: str, causal_lm: str, notes: str,
                  extra: dict[str, str] | None = None) -> Architecture:
    # Gemma3's attention has q/k norms and no soft-cap (its attn_logit_softcapping is never passed on)
    attention = "gemma2_attention" if prefix == "Gemma2" else "attention_layer_window"
    module = "gemma3" if prefix == "Gemma3" else model_type
    embedding = f"{prefix}TextScaledWordEmbedding"
    return _OptionalSwapsArchitecture(
        model_type=model_type,
        modeling_module=f"transformers.models.{module}.modeling_{module}",
        swaps={
            f"{prefix}RMSNorm": "gemma_rms_norm",  # Gemma3: the q/k norms too
            f"{prefix}DecoderLayer": "gemma_decoder_layer",
            f"{prefix}MLP": "gated_mlp",  # GeGLU (gelu_pytorch_tanh)
            f"{prefix}Attention": attention,
            embedding: "scaled_embedding",
            **(extra or {}),
            causal_lm: "causal_lm",  # final_logit_softcapping inside the fused loss (LitesparkCausalLM)
        },
        notes=notes,
        optional=(embedding,),  # Gemma2 before it had the class: a plain nn.Embedding, scaled in the model forward
    )


ARCHITECTURES.update({
    "gemma2": _gemma_family(
        "gemma2", "Gemma2", "Gemma2ForCausalLM",
        "(1 + w) RMSNorm, sandwich norms, GeGLU, query_pre_attn_scalar, attention logit soft-capping (reference "
        "attention), sliding window per layer, scaled embedding, final-logit soft-capping (in the fused loss)"),
    "gemma3_text": _gemma_family(
        "gemma3_text", "Gemma3", "Gemma3ForCausalLM",
        "as Gemma2 with (1 + w) q/k norms and RoPE per layer type; no attention soft-cap",
        extra={"Gemma3TextModel": "gemma3_text_model"}),
    "gemma3": _gemma_family(
        "gemma3", "Gemma3", "Gemma3ForConditionalGeneration",
        "the text tower of Gemma3 (vision tower stock); image batches (token_type_ids) take transformers' masks",
        extra={"Gemma3Model": "gemma3_multimodal_model"}),
})



def _moe_family(model_type: str, prefix: str, notes: str, attention: str, norm: str = "rms_norm",
                decoder_layer: bool = True, dense_mlp: bool = False) -> Architecture:
    """A MoE family: experts (grouped GEMMs), the decoder stack (router logits re-padded), the loss with the aux
    loss; router and MoE block stock. ``dense_mlp``: the family has dense MLPs too (shared expert, mlp_only_layers)."""
    swaps = {
        f"{prefix}RMSNorm": norm,
        f"{prefix}Experts": "moe_experts",
        f"{prefix}Attention": attention,
        f"{prefix}Model": "moe_model",
        f"{prefix}ForCausalLM": "moe_causal_lm",
    }
    if decoder_layer:
        swaps[f"{prefix}DecoderLayer"] = "decoder_layer"
    if dense_mlp:
        swaps[f"{prefix}MLP"] = "gated_mlp"
    return Architecture(model_type=model_type,
                        modeling_module=f"transformers.models.{model_type}.modeling_{model_type}",
                        swaps=swaps, notes=notes)


ARCHITECTURES.update({
    "mixtral": _moe_family(
        "mixtral", "Mixtral", "as Mistral (config window); experts as grouped GEMMs (top-k softmax router, stock; "
        "jitter noise stock)", attention="attention_config_window"),
    "qwen2_moe": _moe_family(
        "qwen2_moe", "Qwen2Moe", "as Qwen2 (q/k/v bias, window per layer); experts as grouped GEMMs, the shared "
        "expert as a gated MLP (its sigmoid gate stock), mlp_only_layers / decoder_sparse_step as dense MLPs",
        attention="attention_layer_window", dense_mlp=True),
    "qwen3_moe": _moe_family(
        "qwen3_moe", "Qwen3Moe", "as Qwen3 (per-head q/k RMSNorm); experts as grouped GEMMs, mlp_only_layers / "
        "decoder_sparse_step as dense MLPs", attention="attention_layer_window", dense_mlp=True),
    "gpt_oss": _moe_family(
        "gpt_oss", "GptOss", "RMSNorm rounding as OLMo (the decoder layer stock: no fused adds), attention sinks "
        "(reference attention, warned once), q/k/v/o bias, sliding / full layers, half-width RoPE; experts as grouped "
        "GEMMs with biases, the clamped interleaved SwiGLU (alpha, limit) as stock",
        attention="attention_sinks", norm="olmo_rms_norm", decoder_layer=False),
})

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(ARCHITECTURES))


def get_architecture(model_type: str) -> Architecture | None:
    return ARCHITECTURES.get(model_type)
