"""Litespark versions of Hugging Face modules, applied by swapping an instance's class in place.

Each mixin here is combined with the Hugging Face class it replaces (``Litespark<Name>(Mixin, <Name>)``) and the
instance's ``__class__`` is pointed at that subclass: parameters, buffers, hooks, PEFT/LoRA wrappers and state-dict
keys stay exactly as they were (nothing is copied), and `restore` points ``__class__`` back.

One file per module kind: `norms`, `decoder`, `mlp`, `attention`, `lm_head`, `embedding` (family variants in
`families`, `gemma`, `moe`); `_swap` builds the swapped
classes; `lora` fuses PEFT LoRA projections into the attention's and MLP's projection groups. The weight casts the
modules read live in `litespark_hf.casting` (re-exported here).
"""

import litespark_kernels as lk  # noqa: F401  (``litespark_hf.modules.lk``: the kernels the modules call)

from ..casting import (
    CastShadow, attach_cast_shadow, cast_projection_weights, detach_cast_shadow, drop_casts, link_cast_owners,
    unlink_cast_owners,
)
from ._swap import original_class, plain_linears, project, swapped_class
from .attention import LitesparkAttention, LitesparkConfigWindowAttention, LitesparkLayerWindowAttention
from .decoder import LitesparkDecoderLayer, link_decoder_layers, unlink_decoder_layers
from .embedding import LitesparkEmbedding
from .gemma import (
    LitesparkGemma2Attention, LitesparkGemma3Model, LitesparkGemma3TextModel, LitesparkGemmaDecoderLayer,
    LitesparkGemmaRMSNorm, LitesparkScaledEmbedding,
)
from .families import (
    LitesparkGraniteDecoderLayer, LitesparkNoRopeAttention, LitesparkOlmoRMSNorm,
    LitesparkPackedGatedMLP, LitesparkPackedQKVAttention, LitesparkPhi3DecoderLayer, LitesparkProjectionNormAttention,
    LitesparkScaledLogitsCausalLM,
)
from .lm_head import LitesparkCausalLM, LitesparkLMHead
from .lora import LoraGroup, LoraTerm, fused_bases, lora_group, lora_project
from .moe import (
    LitesparkExperts, LitesparkMoeCausalLM, LitesparkMoeModel, LitesparkSinkAttention, litespark_experts_forward,
    register_experts_implementation,
)
from .mlp import GELUTanh, LitesparkGatedMLP, LitesparkGeluMLP, SiLUActivation, fused_gated_activation
from .norms import LitesparkLayerNorm, LitesparkRMSNorm, link_norm_consumers, unlink_norm_consumers

__all__ = [
    "CastShadow", "GELUTanh", "LitesparkAttention", "LitesparkCausalLM", "LitesparkConfigWindowAttention",
    "LitesparkDecoderLayer", "LitesparkEmbedding", "LitesparkGatedMLP", "LitesparkGeluMLP", "LitesparkLMHead",
    "LitesparkLayerNorm", "LitesparkLayerWindowAttention", "LitesparkRMSNorm", "LoraGroup", "LoraTerm",
    "SiLUActivation", "attach_cast_shadow", "cast_projection_weights", "detach_cast_shadow", "drop_casts",
    "fused_bases", "fused_gated_activation", "link_cast_owners", "link_decoder_layers", "link_norm_consumers",
    "lora_group", "lora_project", "original_class", "plain_linears", "project", "swapped_class", "unlink_cast_owners",
    "unlink_decoder_layers", "unlink_norm_consumers",
    # Gemma2 / Gemma3 (gemma.py)
    "LitesparkGemma2Attention", "LitesparkGemma3Model", "LitesparkGemma3TextModel", "LitesparkGemmaDecoderLayer",
    "LitesparkGemmaRMSNorm", "LitesparkScaledEmbedding",
    # dense families (families.py)
    "LitesparkGraniteDecoderLayer", "LitesparkNoRopeAttention", "LitesparkOlmoRMSNorm",
    "LitesparkPackedGatedMLP", "LitesparkPackedQKVAttention", "LitesparkPhi3DecoderLayer",
    "LitesparkProjectionNormAttention", "LitesparkScaledLogitsCausalLM",
    # mixture-of-experts families (moe.py)
    "LitesparkExperts", "LitesparkMoeCausalLM", "LitesparkMoeModel", "LitesparkSinkAttention",
    "litespark_experts_forward", "register_experts_implementation",
]

register_experts_implementation()  # experts_implementation="litespark" (transformers' ExpertsInterface)
