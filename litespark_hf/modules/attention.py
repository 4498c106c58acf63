"""The decoder attention with the RoPE kernel and fused q/k/v and output projections."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import litespark_kernels as lk

from ..casting import projection
from ._swap import plain_linears, project
from .lora import fused_bases, lora_group, lora_project


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def project_each(module, x, linears, slot: str) -> list:
    """``[lin(x) for lin in linears]``: one `fused_linear` GEMM for plain ``nn.Linear`` projections, PEFT LoRA ones
    fused where `lora_group` reproduces them, else each called as a module (adapters, hooks and wrappers keep
    working). ``slot``: the module's cast slot of this group (`cast_projection_weights`)."""
    if plain_linears(*linears):
        out = project(x, *linears, **projection(module, slot))
        return list(out.split([m.out_features for m in linears], dim=-1)) if len(linears) > 1 else [out]
    group = lora_group(linears)
    if group is not None:
        return lora_project(x, group, **projection(module, slot), split=True)
    return [m(x) for m in linears]


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """``apply_rotary_pos_emb`` through `litespark_kernels.apply_rope`, partial rotary included: when ``cos`` is
    narrower than a head (``partial_rotary_factor < 1``), the first ``cos.shape[-1]`` channels of each head are
    rotated and the others passed through (transformers' ``cat([rotated, pass], -1)``)."""
    rotary_dim = cos.shape[-1]
    if rotary_dim == q.shape[-1]:
        return lk.apply_rope(q, k, cos, sin)
    q_rot, k_rot = lk.apply_rope(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin)
    return torch.cat([q_rot, q[..., rotary_dim:]], dim=-1), torch.cat([k_rot, k[..., rotary_dim:]], dim=-1)


class LitesparkAttention:
    """The decoder attention of Llama / Mistral / Qwen2 / Qwen3 / StarCoder2 with the RoPE kernel.

    Same steps as transformers' forward: projections (q/k/v as one GEMM, PEFT LoRA fused in where `lora_group`
    reproduces it, else called as modules), optional per-head q/k norms (Qwen3), rotary embedding
    (`litespark_kernels.apply_rope`), KV cache update, the configured attention backend (``litespark`` after
    `apply`), output projection, optional residual dropout (StarCoder2).
    This class never uses a sliding window (Llama); the subclasses below read it where their family does. The
    steps a family may change are methods (`_litespark_qkv_linears`, `_litespark_project_qkv`, `_litespark_heads`,
    `_litespark_rope`; see `litespark_hf.modules.families`).
    """

    def _sliding_window(self):
        return None

    def _litespark_qkv_linears(self) -> tuple:
        """The projections that read the hidden states (one GEMM when plain; Phi-3 overrides: one ``qkv_proj``)."""
        return self.q_proj, self.k_proj, self.v_proj

    def _litespark_project_qkv(self, hidden_states):
        """q, k, v as [..., heads * head_dim]."""
        return project_each(self, hidden_states, self._litespark_qkv_linears(), "qkv")

    def _litespark_heads(self, q, k, hidden_shape):
        """q and k as [..., heads, head_dim], after the per-head q/k norms (Qwen3) when there are any."""
        q, k = q.view(hidden_shape), k.view(hidden_shape)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k

    def _litespark_rope(self, q, k, position_embeddings):
        cos, sin = position_embeddings
        return rotate(q, k, cos, sin)

    def litespark_casts_input(self) -> bool:
        """True when forward feeds its input only to `fused_linear` (so a low-precision input changes nothing)."""
        linears = self._litespark_qkv_linears()
        if plain_linears(*linears):
            return True
        group = lora_group(linears)
        return group is not None and group.casts_input

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The projection groups forward runs through `fused_linear` (for `cast_projection_weights`; LoRA: the
        base layers)."""
        groups = {}
        for slot, linears in (("qkv", self._litespark_qkv_linears()), ("o", (self.o_proj,))):
            bases = fused_bases(linears)
            if bases is not None:
                groups[slot] = bases
        return groups

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states, key_states, value_states = self._litespark_project_qkv(hidden_states)
        query_states, key_states = self._litespark_heads(query_states, key_states, hidden_shape)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = value_states.view(hidden_shape).transpose(1, 2)
        query_states, key_states = self._litespark_rope(query_states, key_states, position_embeddings)

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
        attn_output = project_each(self, attn_output, (self.o_proj,), "o")[0]
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
