"""Gemma2 / Gemma3 (text tower, and the text tower of the multimodal Gemma3): the family's quirks on top of the
Llama-family mixins.

- RMSNorm: ``(x_hat * (1 + weight)).type_as(x)``, the product in fp32 (weights stored minus one, initialised to 0):
  `litespark_kernels.rms_norm` with ``offset=1.0`` (`LitesparkGemmaRMSNorm`); Gemma3's per-head q/k norms are the
  same class.
- Decoder layer: four norms ("sandwich": input, post-attention, pre-feedforward, post-feedforward). The residual add
  follows each post-norm: ``h = residual + post_attn(attn(input(x)))``, ``out = h + post_ff(mlp(pre_ff(h)))``. So
  the adds are fused into the norm that reads the sum: the first into the pre-feedforward norm, the second into the
  next layer's input norm (or the final norm), as `LitesparkDecoderLayer` hands it over
  (`LitesparkGemmaDecoderLayer`).
- Attention: q/k/v as one GEMM, RoPE kernel, q/k norms (Gemma3), ``scaling = query_pre_attn_scalar ** -0.5`` (the
  module's ``scaling``), the layer's own ``sliding_window`` (`LitesparkLayerWindowAttention`, Gemma3) and Gemma2's
  ``softcap`` (attention logit soft-capping), passed to the attention function as the stock forward passes them
  (`LitesparkGemma2Attention`). Gemma3 keeps ``attn_logit_softcapping`` on the module but never passes it: neither
  does Litespark.
- MLP: gate/up/down with GELU-tanh (``gelu_pytorch_tanh``): `LitesparkGatedMLP` (GeGLU) as is.
- Embedding scaled by sqrt(hidden_size) (``*TextScaledWordEmbedding``): the stock lookup and scale; tied to a
  Litespark LM head, the lookup's gradient goes into the fused loss's (`LitesparkScaledEmbedding`).
- Final-logit soft-capping (``final_logit_softcapping``): inside the fused loss (``softcap``: cap * tanh(z / cap) on
  each chunk of logits, its derivative in the backward) when the stock causal LM's own forward applies it
  (Gemma2ForCausalLM, Gemma3ForCausalLM; `LitesparkCausalLM`); a cap the stock forward would not apply (the multimodal
  Gemma3's text config) keeps the stock loss.
- Masks that are not causal: Gemma3's multimodal base gives batches with image tokens (``token_type_ids``)
  transformers' own masks (bidirectional attention inside each image) and keeps them padded
  (`LitesparkGemma3Model`); ``use_bidirectional_attention`` (EmbeddingGemma-style) batches stay padded too
  (`LitesparkGemma3TextModel`): transformers' masks carry no document separation for `litespark_hf.unpadding`'s
  packed row.
"""

from __future__ import annotations

import copy
import importlib

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import litespark_kernels as lk

from ._swap import original_class
from .attention import LitesparkLayerWindowAttention
from .decoder import LitesparkDecoderLayer, _hookless
from .embedding import LitesparkEmbedding
from .norms import LitesparkRMSNorm


class LitesparkGemmaRMSNorm(LitesparkRMSNorm):
    """Gemma's RMSNorm (``weight``, ``eps``): ``(x_hat * (1 + weight)).type_as(x)`` with the product in fp32, through
    `litespark_kernels.rms_norm` / ``add_rms_norm`` with ``offset=1.0``. Otherwise as `LitesparkRMSNorm` (the
    autocast-dtype output for a consumer that casts anyway, the hand-over from the previous decoder layer)."""

    _litespark_offset = 1.0

    def _litespark_eps(self) -> float:
        return self.eps


class LitesparkGemmaDecoderLayer(LitesparkDecoderLayer):
    """Gemma2/3's decoder layer (sandwich norms) with its two residual adds fused into the norms that read the sums:

        h   = residual + post_attention_layernorm(self_attn(input_layernorm(x)))
        out = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))

    ``pre_feedforward_layernorm`` computes ``h`` and its norm in one pass (`LitesparkRMSNorm.forward_add`), and the
    next norm (the next layer's input norm, or the final norm) does the same for ``out`` (handed over as in
    `LitesparkDecoderLayer`, under the same conditions). The post-norms are called as modules. Same values as stock;
    the stock forward runs when the pre-feedforward norm is not a Litespark Gemma norm or has hooks."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None,
                past_key_values=None, **kwargs):
        pre = self.pre_feedforward_layernorm
        if not (isinstance(pre, LitesparkGemmaRMSNorm) and _hookless(pre)):
            return super(LitesparkDecoderLayer, self).forward(
                hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                position_ids=position_ids, past_key_values=past_key_values, **kwargs,
            )
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
            position_ids=position_ids, past_key_values=past_key_values, **kwargs,
        )
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states, residual = pre.forward_add(hidden_states, residual)
        hidden_states = self.post_feedforward_layernorm(self.mlp(hidden_states))
        return self._litespark_add_to_next(hidden_states, residual)


class LitesparkGemma2Attention(LitesparkLayerWindowAttention):
    """Gemma2 attention: `LitesparkAttention` (q/k/v as one GEMM, RoPE kernel, ``scaling``, the layer's
    ``sliding_window``) plus ``softcap=attn_logit_softcapping``, handed to the
    attention function as the stock forward hands it (the ``litespark`` backend runs soft-capped attention on its
    PyTorch reference, flash/flex attention take it natively).

    Under ``attn_implementation="eager"`` with a soft-cap, the stock forward runs: `LitesparkAttention`'s eager
    fallback is Llama's, which has no soft-cap."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        softcap = getattr(self, "attn_logit_softcapping", None)
        if softcap is not None:
            if ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, None) is None:
                return original_class(self).forward(self, hidden_states, position_embeddings, attention_mask,
                                                    past_key_values, **kwargs)
            kwargs["softcap"] = softcap
        return super().forward(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                               past_key_values=past_key_values, **kwargs)


class LitesparkScaledEmbedding(LitesparkEmbedding):
    """Gemma's scaled word embedding (``lookup * embed_scale``, the scale in the weight's dtype) tied to a Litespark
    LM head: in a fused-loss training forward the lookup's weight gradient is added into the loss's in place
    (`litespark_kernels.tied_embedding`); the scale is applied after the lookup, as stock, so its gradient is the
    stock one. Every other call is the stock forward."""

    def forward(self, input):
        slot = self._tied_slot()
        if slot is None:
            return super().forward(input)
        return lk.tied_embedding(input, self.weight, self.padding_idx, slot) * self.embed_scale.to(self.weight.dtype)


def _litespark_backend(config) -> bool:
    from ..attention import ATTENTION_NAME

    return config._attn_implementation == ATTENTION_NAME


class LitesparkGemma3TextModel:
    """Gemma3's text model with ``use_bidirectional_attention`` (EmbeddingGemma-style: no causal mask, a windowed
    bidirectional overlay on the sliding layers). transformers builds these masks itself (the backend takes them
    exactly, through SDPA), so `litespark_hf.unpadding` leaves such a padded batch padded
    (`litespark_keeps_padding`). Causal models: unchanged."""

    def litespark_keeps_padding(self, kwargs) -> bool:
        return bool(getattr(self.config, "use_bidirectional_attention", False)) and _litespark_backend(self.config)


class LitesparkGemma3Model:
    """Gemma3's multimodal base (vision tower + text tower) under the ``litespark`` attention backend.

    With image tokens (``token_type_ids``), transformers' masks let each image attend to itself bidirectionally
    (an OR of the causal mask and a block overlay that the backend's fast path, which rebuilds only causal, sliding
    and packed masks from its arguments, cannot see). Such a batch therefore gets transformers' own 4D masks (built
    by the stock mask code with SDPA's mask function; the backend then runs SDPA, or its soft-cap reference, with
    them) and stays padded (`litespark_keeps_padding`: `litespark_hf.unpadding` would pack ``input_ids`` but not
    ``token_type_ids``). Text-only batches and any other attention implementation take the stock forward unchanged
    (with ``use_bidirectional_attention``, padded batches stay padded, as in `LitesparkGemma3TextModel`)."""

    def litespark_keeps_padding(self, kwargs) -> bool:
        text_config = self.config.get_text_config()
        images = kwargs.get("token_type_ids") is not None
        return (images or bool(getattr(text_config, "use_bidirectional_attention", False))) \
            and _litespark_backend(text_config)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                past_key_values=None, token_type_ids=None, inputs_embeds=None, **kwargs):
        text_config = self.config.get_text_config()
        if token_type_ids is not None and not isinstance(attention_mask, dict) and _litespark_backend(text_config):
            attention_mask = self._litespark_image_masks(text_config, input_ids, inputs_embeds, attention_mask,
                                                         past_key_values, position_ids, token_type_ids)
        return super().forward(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds, **kwargs,
        )

    def _litespark_image_masks(self, text_config, input_ids, inputs_embeds, attention_mask, past_key_values,
                               position_ids, token_type_ids):
        """The stock ``{"full_attention": ..., "sliding_attention": ...}`` masks of an image batch, built with SDPA's
        mask function (exact 4D masks), or the 2D mask as given where this transformers version builds them
        differently (an ``or_mask_function``, which the backend already takes exactly)."""
        modeling = importlib.import_module(type(self).__litespark_original__.__module__)
        build = getattr(modeling, "create_masks_for_vision_model", None)
        blocks = getattr(modeling, "get_block_sequence_ids_for_mask", None)
        if build is None or blocks is None:
            return attention_mask
        ref = input_ids if input_ids is not None else inputs_embeds
        batch, seq = ref.shape[:2]
        # only the shape, dtype and device of the embeddings enter the mask
        embeds = torch.empty((batch, seq, 0), dtype=self.get_input_embeddings().weight.dtype, device=ref.device)
        config = copy.copy(text_config)
        config._attn_implementation = "sdpa"
        return build(
            config=config, inputs_embeds=embeds, attention_mask=attention_mask, past_key_values=past_key_values,
            position_ids=position_ids, block_sequence_ids=blocks(token_type_ids, device=ref.device),
        )


__all__ = [
    "LitesparkGemma2Attention", "LitesparkGemma3Model", "LitesparkGemma3TextModel", "LitesparkGemmaDecoderLayer",
    "LitesparkGemmaRMSNorm", "LitesparkScaledEmbedding",
]
