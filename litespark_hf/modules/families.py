"""Litespark modules for the dense families whose computation differs from Llama's in one step: Phi-3, SmolLM3,
OLMo-2 / OLMo-3, Granite (Ministral is Mistral with per-layer windows and uses `LitesparkLayerWindowAttention`).

Each class subclasses the Llama-family mixin and overrides only the step that differs:

- attention: `LitesparkAttention`'s steps (projections, q/k norms, rotary embedding, partial rotary included)
  overridden where a family differs:
  - `LitesparkPackedQKVAttention` (Phi-3): one ``qkv_proj``, window ``config.sliding_window``.
  - `LitesparkNoRopeAttention` (SmolLM3): no rotary embedding where ``use_rope`` is off, per-layer window.
  - `LitesparkProjectionNormAttention` (OLMo-2 / OLMo-3): q/k RMSNorms over the whole projection (before the
    heads are split), RoPE rounded back to q's dtype, per-layer window (OLMo-3's sliding layers).
- `LitesparkPackedGatedMLP` (Phi-3): one ``gate_up_proj`` (gate = first half) through the packed SwiGLU / GeGLU.
- `LitesparkOlmoRMSNorm` (OLMo-2 / OLMo-3): ``(weight * normed).to(input dtype)`` - the weight applied before the
  rounding, unlike Llama's norm.
- decoder layers: `LitesparkDecoderLayer` (both residual adds fused into the RMSNorms) with each branch's output
  passed through `_litespark_branch` before its add: Phi-3's residual dropouts (`LitesparkPhi3DecoderLayer`),
  Granite's ``residual_multiplier`` (`LitesparkGraniteDecoderLayer`).
  OLMo's post-norm layers (norm of the branch output, then the add) are not swapped: the fused adds assume pre-norm.
- `LitesparkScaledLogitsCausalLM` (Granite): the fused loss on ``hidden / logits_scaling`` (Granite's logits are
  ``lm_head(hidden) / logits_scaling``, and ``W (h / s) = (W h) / s`` for a head without bias).
"""

from __future__ import annotations

import torch

import litespark_kernels as lk
from litespark_kernels._dispatch import warn_once

from ..casting import projection
from ._swap import plain_linears, project
from .attention import LitesparkConfigWindowAttention, LitesparkLayerWindowAttention, project_each
from .decoder import LitesparkDecoderLayer, _hookless
from .lm_head import LitesparkCausalLM, LitesparkLMHead
from .lora import _plain_linear, lora_group, lora_project
from .mlp import LitesparkGatedMLP, fused_gated_activation



class LitesparkPackedQKVAttention(LitesparkConfigWindowAttention):
    """Phi-3: q, k and v from one ``qkv_proj`` (sliced as stock: q, then k, then the rest), partial rotary
    embedding (``partial_rotary_factor``), window ``config.sliding_window``."""

    def _litespark_qkv_linears(self) -> tuple:
        return (self.qkv_proj,)

    def _litespark_project_qkv(self, hidden_states: torch.Tensor):
        (qkv,) = project_each(self, hidden_states, (self.qkv_proj,), "qkv")
        q_end = self.config.num_attention_heads * self.head_dim
        k_end = q_end + self.num_key_value_heads * self.head_dim
        return qkv[..., :q_end], qkv[..., q_end:k_end], qkv[..., k_end:]


class LitesparkNoRopeAttention(LitesparkLayerWindowAttention):
    """SmolLM3: layers with ``use_rope`` off (``config.no_rope_layers``) take no rotary embedding at all; window
    per layer (``sliding_window``: None on full-attention layers)."""

    def _litespark_rope(self, q, k, position_embeddings):
        if not self.use_rope:
            return q, k
        return super()._litespark_rope(q, k, position_embeddings)


class LitesparkProjectionNormAttention(LitesparkLayerWindowAttention):
    """OLMo-2 / OLMo-3: ``q_norm`` / ``k_norm`` normalise the whole q / k projection ([..., heads * head_dim]) before
    the split into heads; the rotary embedding (fp32 cos/sin) is rounded back to q's / k's dtype, as stock; window
    per layer (OLMo-3's sliding layers; OLMo-2 has none)."""

    def _litespark_heads(self, q, k, hidden_shape):
        return self.q_norm(q).view(hidden_shape), self.k_norm(k).view(hidden_shape)

    def _litespark_rope(self, q, k, position_embeddings):
        q_dtype, k_dtype = q.dtype, k.dtype
        q, k = super()._litespark_rope(q, k, position_embeddings)
        return q.to(q_dtype), k.to(k_dtype)


class LitesparkPackedGatedMLP(LitesparkGatedMLP):
    """Phi-3's MLP: ``gate, up = gate_up_proj(x).chunk(2); down(up * act(gate))`` - the packed activation kernel
    (`litespark_kernels.swiglu_packed` / ``geglu_packed``: gate = first half, up = second half) on the one
    ``gate_up_proj`` GEMM. PEFT LoRA projections fused where `lora_group` reproduces them; other wrappers, and an
    activation without a kernel (warned once), run the stock forward."""

    def _fused(self):
        packed = fused_gated_activation(self.activation_fn, packed=True)
        if packed is None:
            return None, None
        if plain_linears(self.gate_up_proj, self.down_proj):
            return packed, None
        gate_up = lora_group((self.gate_up_proj,))
        down = lora_group((self.down_proj,)) if gate_up is not None else None
        return (packed, (gate_up, down)) if down is not None else (None, None)

    def litespark_cast_groups(self) -> dict:
        packed, groups = self._fused()
        if packed is None:
            return {}
        if groups is None:
            return {"gate_up": [self.gate_up_proj], "down": [self.down_proj]}
        return {"gate_up": list(groups[0].base), "down": list(groups[1].base)}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        packed, groups = self._fused()
        if packed is None:
            if fused_gated_activation(self.activation_fn, packed=True) is None:
                warn_once("gated_mlp", f"activation {type(self.activation_fn).__name__} has no fused kernel")
            return super(LitesparkGatedMLP, self).forward(hidden_states)  # the stock Phi3MLP
        if groups is not None:  # LoRA: the base gate_up GEMM, adapters added
            gate_up = lora_project(hidden_states, groups[0], **projection(self, "gate_up"))
            return lora_project(packed(gate_up), groups[1], **projection(self, "down"))
        gate_up = project(hidden_states, self.gate_up_proj, **projection(self, "gate_up"))
        return project(packed(gate_up), self.down_proj, **projection(self, "down"))


class LitesparkOlmoRMSNorm:
    """OLMo-2 / OLMo-3 RMSNorm, ``(weight * normed_fp32).to(input dtype)``, through `litespark_kernels.rms_norm`.

    Llama's norm (the kernel's own rounding order) rounds the normalised value to the input dtype before the
    weight; OLMo's applies the weight in fp32 and rounds once. The kernel gets the input in fp32 (then it rounds
    nothing before the weight) and writes the input dtype: the same values (a bf16 input costs one cast to fp32).
    Not a `LitesparkRMSNorm`: OLMo's post-norms feed residual adds, not the projections, so nothing is linked to
    them."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states if dtype == torch.float32 else hidden_states.float()
        return lk.rms_norm(x, self.weight, self.variance_epsilon, out_dtype=dtype)


class LitesparkPhi3DecoderLayer(LitesparkDecoderLayer):
    """Phi-3: ``residual + resid_attn_dropout(attn)``, ``residual + resid_mlp_dropout(mlp)``."""

    _litespark_keeps_name = True

    def _litespark_branch(self, out, branch):
        return self.resid_attn_dropout(out) if branch == "attention" else self.resid_mlp_dropout(out)


class LitesparkGraniteDecoderLayer(LitesparkDecoderLayer):
    """Granite: ``residual + out * residual_multiplier`` after the attention and after the MLP."""

    _litespark_keeps_name = True

    def _litespark_branch(self, out, branch):
        return out * self.residual_multiplier


class LitesparkScaledLogitsCausalLM(LitesparkCausalLM):
    """Granite's causal LM (``logits = lm_head(hidden) / config.logits_scaling``) training on the fused linear
    cross-entropy of ``hidden / logits_scaling`` (the same logits: the head has no bias). Used in training with
    labels when the head is a Litespark head (computed in its own forward) or a plain, hookless, unsharded
    ``nn.Linear`` without bias; otherwise (eval, generation, a wrapped or sharded head) the stock forward, which
    returns logits."""

    def _litespark_head(self):
        """'litespark' (a `LitesparkLMHead`), 'linear' (a plain head whose weight the loss reads), or None."""
        head = self.lm_head
        if head.bias is not None:
            return None
        if isinstance(head, LitesparkLMHead):
            return "litespark" if _hookless(head) else None
        return "linear" if _plain_linear(head) else None

    def _litespark_final_hidden(self, hidden):
        return hidden / self.config.logits_scaling
