"""Mixture-of-experts families: Mixtral, Qwen2-MoE, Qwen3-MoE, GPT-OSS.

transformers 5.x keeps each layer's experts as fused 3D parameters in a ``<Prefix>Experts`` module
(``@use_experts_implementation``: ``gate_up_proj`` [E, 2I, h] and ``down_proj`` [E, h, I], or transposed with
biases and gate/up interleaved for GPT-OSS). What is swapped here:

- `LitesparkExperts`: the experts' forward as `litespark_experts_forward` - the (token, expert) pairs sorted by
  expert once, the offsets of each expert's rows computed on the device (no host sync), ONE grouped GEMM per
  projection for all experts (`litespark_kernels.grouped_linear`: torch's grouped GEMM on CUDA in bf16), the
  gate/up activation through the fused packed SwiGLU / GeGLU kernels where the layout and activation allow it (else
  the family's own ``_apply_gate``: GPT-OSS's clamped, interleaved SwiGLU runs as stock), the routing-weighted
  results put back in token order and summed over each token's top-k in a fixed order (deterministic, no atomics).
  The router (top-k, softmax before or after it, ``norm_topk_prob``), the MoE block (jitter noise, Qwen2-MoE's shared
  expert and its sigmoid gate) and the auxiliary loss stay stock code. The same function is registered in
  transformers' experts interface as ``experts_implementation="litespark"``.
- `LitesparkMoeModel`: the decoder stack; after `litespark_hf.unpadding` ran it on the real tokens only, the
  per-layer router logits are scattered back to ``[batch * seq, experts]`` (zeros at the pads), so the stock
  load-balancing loss with the padding mask sees the shapes, and the values at every real token, that stock gives.
- `LitesparkMoeCausalLM`: the fused linear cross-entropy plus ``router_aux_loss_coef * aux_loss`` (the family's own
  ``load_balancing_loss_func`` on the router logits) when ``output_router_logits`` is on.
- `LitesparkSinkAttention` (GPT-OSS): per-layer window, the attention sinks passed on (``s_aux``: the backend's
  PyTorch reference, warned once) and GPT-OSS's half-width cos/sin (its rotation of the two halves is the
  ``rotate_half`` one with cos/sin repeated).

Attention, norms, decoder layers, dense MLPs (Qwen-MoE's shared expert and ``mlp_only_layers``) use the existing
mixins (see `litespark_hf.architectures`).
"""

from __future__ import annotations

import sys

import torch
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

import litespark_kernels as lk
from litespark_kernels._dispatch import warn_once

from ..casting import cast_projection_weights, drop_casts
from ._swap import original_class
from .attention import LitesparkLayerWindowAttention
from .lm_head import LitesparkCausalLM, LitesparkLMHead
from .mlp import fused_gated_activation

EXPERTS_IMPLEMENTATION = "litespark"


def _stock_experts_class(module) -> type:
    return original_class(module) or type(module)


def _default_gate(module) -> bool:
    """True when the experts use transformers' default gate: ``act(gate) * up`` on ``chunk(2)`` halves."""
    from transformers.integrations import moe

    return getattr(_stock_experts_class(module), "_apply_gate", None) is getattr(moe, "_default_apply_gate", None)


def litespark_experts_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                              top_k_weights: torch.Tensor) -> torch.Tensor:
    """An experts module's forward: ``hidden_states`` [T, h], ``top_k_index`` / ``top_k_weights`` [T, k] ->
    ``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])`` [T, h].

    Sort the T*k (token, expert) pairs by expert (stable), gather their rows, count rows per expert with a scatter-add
    (fixed size, no sync), cumulative offsets; up (gate_up) grouped GEMM, activation, down grouped GEMM, times the
    routing weight; pairs scattered back to (token, slot) order and summed over the slots. Expert parallelism
    (sentinel expert ids) is not handled: such modules run transformers' grouped_mm forward."""
    from transformers.integrations import moe

    if getattr(module, "_is_expert_parallel", False):
        return moe.grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    num_tokens, top_k = top_k_index.shape
    num_experts = module.num_experts
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    sorted_ids = expert_ids.index_select(0, order)
    rows = hidden_states.index_select(0, order // top_k)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=expert_ids.device)
    counts.scatter_add_(0, expert_ids, torch.ones_like(expert_ids, dtype=torch.int32))
    offsets = counts.cumsum(0, dtype=torch.int32)

    has_bias = getattr(module, "has_bias", False)
    transposed = getattr(module, "is_transposed", False)
    if getattr(module, "has_gate", True):
        weight, bias = module.gate_up_proj, getattr(module, "gate_up_proj_bias", None) if has_bias else None
    else:
        weight, bias = module.up_proj, getattr(module, "up_proj_bias", None) if has_bias else None
    h = lk.grouped_linear(rows, weight, offsets, bias, transposed=transposed, groups=sorted_ids)
    if getattr(module, "has_gate", True):
        packed = None
        if getattr(module, "is_concatenated", True) and _default_gate(module):
            packed = fused_gated_activation(module.act_fn, packed=True)
        h = packed(h) if packed is not None else module._apply_gate(h)
    else:
        h = module.act_fn(h)
    down_bias = getattr(module, "down_proj_bias", None) if has_bias else None
    out = lk.grouped_linear(h, module.down_proj, offsets, down_bias, transposed=transposed, groups=sorted_ids)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    unsorted = out.new_empty(out.shape).index_copy(0, order, out)  # pair p back at row p = token * k + slot
    return unsorted.view(num_tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def register_experts_implementation() -> None:
    """``experts_implementation="litespark"`` for transformers' MoE models (idempotent)."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, litespark_experts_forward)


class LitesparkExperts:
    """A ``@use_experts_implementation`` experts module whose forward is `litespark_experts_forward`, whatever
    ``config._experts_implementation`` says (the swap is per module; `litespark_hf.restore` puts the stock class,
    and with it the configured implementation, back)."""

    def forward(self, hidden_states, top_k_index=None, top_k_weights=None):
        return litespark_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class LitesparkMoeModel:
    """The MoE decoder stack: router logits of an unpadded forward (`litespark_hf.unpadding`) scattered back to the
    caller's ``[batch * seq, experts]`` rows (zeros at the pads, which the padding mask excludes from the
    load-balancing loss), as stock returns them."""

    def _litespark_record_outputs(self) -> None:
        """transformers records router logits / hidden states through a registry keyed by the model's class name
        (``str(type(model))``, filled at init): the swapped class gets the stock class's entry."""
        from transformers.utils import output_capturing

        registry = output_capturing._CAN_RECORD_REGISTRY
        key = str(type(self))
        if dict.get(registry, key) is None:  # dict's own methods: the registry is a dict (5.17) or a dict subclass
            dict.__setitem__(registry, key, self._can_record_outputs)

    def forward(self, *args, **kwargs):
        self._litespark_record_outputs()
        out = super().forward(*args, **kwargs)
        state = self.__dict__.get("_litespark_unpad")  # set by the unpadding pre-hook, popped by its post-hook
        logits = getattr(out, "router_logits", None)
        if state is not None and logits:
            idx, batch, seq = state
            out.router_logits = tuple(
                r.new_zeros(batch * seq, r.shape[-1]).index_copy(0, idx, r.reshape(-1, r.shape[-1]))
                for r in logits)
        return out


class LitesparkMoeCausalLM(LitesparkCausalLM):
    """A MoE causal LM training on the fused linear cross-entropy, plus ``router_aux_loss_coef * aux_loss`` (the
    family's own ``load_balancing_loss_func``, stock code) when ``output_router_logits`` (argument, else config) is
    on. Evaluation, generation and calls without labels or a Litespark head run the stock forward."""

    def _litespark_aux_loss_function(self):
        stock = original_class(self) or type(self)
        return getattr(sys.modules[stock.__module__], "load_balancing_loss_func")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_router_logits=None, logits_to_keep=0,
                **kwargs):
        shift_labels = kwargs.get("shift_labels")
        fused = (self.training and (labels is not None or shift_labels is not None)
                 and isinstance(self.lm_head, LitesparkLMHead))
        if fused and (cap := self._litespark_logit_softcap()) is not None:
            warn_once("fused_cross_entropy", f"final_logit_softcapping={cap} is not in the fused loss: the stock loss "
                                             "runs")
            fused = False
        if not fused:
            return super(LitesparkCausalLM, self).forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                output_router_logits=output_router_logits, logits_to_keep=logits_to_keep, **kwargs,
            )
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("ignore_index", None)
        if shift_labels is None:
            shift_labels = lk.shifted_labels(labels)
        label_count = lk.count_labels(shift_labels) \
            if shift_labels.is_cuda and not torch.compiler.is_compiling() else None  # as LitesparkCausalLM
        given = cast_projection_weights(self, self.lm_head.weight.device.type)
        try:
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                output_router_logits=output_router_logits, **kwargs,
            )
            loss = self.lm_head(outputs.last_hidden_state, shift_labels=shift_labels,
                                num_items_in_batch=num_items_in_batch, label_count=label_count)
        finally:
            drop_casts(given)
        aux_loss = None
        if output_router_logits:
            aux_loss = self._litespark_aux_loss_function()(
                outputs.router_logits, self.num_experts, self.num_experts_per_tok, attention_mask)
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=None, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


class LitesparkSinkAttention(LitesparkLayerWindowAttention):
    """GPT-OSS attention: q/k/v/o with bias (one GEMM for q/k/v), window per layer (``sliding_window``: None on
    full-attention layers), the per-head sinks passed to the backend as ``s_aux``, and GPT-OSS's rotary embedding:
    its cos/sin cover half a head and rotate ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)``, which is the
    ``rotate_half`` rotation with cos/sin repeated over both halves."""

    def _litespark_rope(self, q, k, position_embeddings):
        cos, sin = position_embeddings
        if cos.shape[-1] * 2 == q.shape[-1]:
            cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
        return super()._litespark_rope(q, k, (cos, sin))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        kwargs["s_aux"] = self.sinks
        return super().forward(hidden_states, position_embeddings=position_embeddings,
                               attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
