"""The decoder attention with the RoPE kernel and fused q/k/v and output projections."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import litespark_kernels as lk

from ..casting import _cast_of
from ._swap import plain_linears, project
from .lora import fused_bases, lora_group, lora_project


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


class LitesparkAttention:
    """The decoder attention of Llama / Mistral / Qwen2 / Qwen3 / StarCoder2 with the RoPE kernel.

    Same steps as transformers' forward: projections (q/k/v as one GEMM, PEFT LoRA fused in where `lora_group`
    reproduces it, else called as modules), optional per-head q/k norms (Qwen3), rotary embedding
    (`litespark_kernels.apply_rope`), KV cache update, the configured attention backend (``litespark`` after
    `apply`), output projection, optional residual dropout (StarCoder2).
    This class never uses a sliding window (Llama); the subclasses below read it where their family does.
    """

    def _sliding_window(self):
        return None

    def litespark_casts_input(self) -> bool:
        """True when forward feeds its input only to `fused_linear` (so a low-precision input changes nothing)."""
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        if plain_linears(*qkv):
            return True
        group = lora_group(qkv)
        return group is not None and group.casts_input

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The projection groups forward runs through `fused_linear` (for `cast_projection_weights`; LoRA: the
        base layers)."""
        groups = {}
        for slot, linears in (("qkv", (self.q_proj, self.k_proj, self.v_proj)), ("o", (self.o_proj,))):
            bases = fused_bases(linears)
            if bases is not None:
                groups[slot] = bases
        return groups

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        qkv = (self.q_proj, self.k_proj, self.v_proj)
        if plain_linears(*qkv):  # one GEMM for q, k and v
            sizes = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
            query_states, key_states, value_states = project(
                hidden_states, *qkv, cast=_cast_of(self, "qkv")).split(sizes, dim=-1)
        elif (group := lora_group(qkv)) is not None:  # LoRA: one GEMM for the base q, k and v, then the adapters
            query_states, key_states, value_states = lora_project(
                hidden_states, group, cast=_cast_of(self, "qkv"), split=True)
        else:
            query_states = self.q_proj(hidden_states)
            key_states = self.k_proj(hidden_states)
            value_states = self.v_proj(hidden_states)
        query_states = query_states.view(hidden_shape)
        key_states = key_states.view(hidden_shape)
        if hasattr(self, "q_norm"):
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states = query_states.transpose(1, 2)
        key_states = key_states.transpose(1, 2)
        value_states = value_states.view(hidden_shape).transpose(1, 2)

        cos, sin = position_embeddings
        query_states, key_states = lk.apply_rope(query_states, key_states, cos, sin)

        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, _eager_attention)
        sliding_window = self._sliding_window()
        extra = {"sliding_window": sliding_window} if sliding_window is not None else {}
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        if plain_linears(self.o_proj):
            attn_output = project(attn_output, self.o_proj, cast=_cast_of(self, "o"))
        elif (group := lora_group((self.o_proj,))) is not None:
            attn_output = lora_project(attn_output, group, cast=_cast_of(self, "o"))
        else:
            attn_output = self.o_proj(attn_output)
        if hasattr(self, "residual_dropout"):
            attn_output = F.dropout(attn_output, p=self.residual_dropout, training=self.training)
        return attn_output, attn_weights


class LitesparkConfigWindowAttention(LitesparkAttention):
    """Attention whose sliding window is ``config.sliding_window`` (Mistral, StarCoder2)."""

    def _sliding_window(self):
        return getattr(self.config, "sliding_window", None)


class LitesparkLayerWindowAttention(LitesparkAttention):
    """Attention whose sliding window is the module's own ``sliding_window`` (Qwen2, Qwen3: per layer type)."""

    def _sliding_window(self):
        return getattr(self, "sliding_window", None)
