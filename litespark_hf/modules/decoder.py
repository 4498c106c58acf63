"""The decoder layer with its residual adds fused into the RMSNorms around it."""

from __future__ import annotations

import torch
import torch.nn as nn

from litespark_kernels.ops.linear import _plain_tensor

from .norms import LitesparkRMSNorm


def _hookless(module: nn.Module) -> bool:
    """No forward hooks on ``module`` nor global ones (a fused call would skip them)."""
    return not (module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


class LitesparkDecoderLayer:
    """The pre-norm decoder layer of Llama / Mistral / Qwen2 / Qwen3 with its residual adds fused into RMSNorms
    (`litespark_kernels.add_rms_norm`: one pass writes the residual sum and the normed output; in the backward the
    residual gradient is added inside the norm's kernel). Same values as stock.

    - The attention's residual add is fused into this layer's post-attention norm.
    - The MLP's residual add is fused into the NEXT norm (the next layer's input norm, or the model's final norm;
      linked by `link_decoder_layers`): this layer returns the sum as usual and leaves the normed sum with that
      norm, which returns it when called on exactly that tensor (otherwise it computes as usual). Not under
      gradient checkpointing (the recomputed layer must save what the first pass saved), torch.compile, or when
      the next norm's weight is sharded (FSDP, ZeRO-3: gathered only in its own layer's forward) or elsewhere.

    With `LitesparkConfig.cuda_graphs`, the first layer's call may replay the whole stack from CUDA graphs
    (`litespark_hf.graphs`) and the later layers then pass its output through.

    The class keeps the stock class's name (FSDP's and accelerate's wrap policies find decoder layers by class
    name). The stock forward runs instead when the post-attention norm is not a Litespark RMSNorm or has hooks.
    """

    _litespark_keeps_name = True  # read by `swapped_class`

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
        graphs = self.__dict__.get("_litespark_graphs")  # LitesparkConfig.cuda_graphs (litespark_hf.graphs)
        if graphs is not None and not torch.compiler.is_compiling():
            out = graphs[0].call(graphs[1], hidden_states, attention_mask, position_ids, past_key_values, use_cache,
                                 position_embeddings, kwargs)
            if out is not None:
                return out
        post = self.post_attention_layernorm
        if not (isinstance(post, LitesparkRMSNorm) and _hookless(post)):
            return super().forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, use_cache=use_cache,
                                   position_embeddings=position_embeddings, **kwargs)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings, **kwargs,
        )
        hidden_states, residual = post.forward_add(self._litespark_branch(hidden_states, "attention"), residual)
        hidden_states = self._litespark_branch(self.mlp(hidden_states), "mlp")
        return self._litespark_add_to_next(hidden_states, residual)

    def _litespark_branch(self, out: torch.Tensor, branch: str) -> torch.Tensor:
        """A branch's output before its residual add (``branch``: "attention" or "mlp"): as is here; Phi-3's residual
        dropouts and Granite's ``residual_multiplier`` override it (`litespark_hf.modules.families`)."""
        return out

    def _litespark_add_to_next(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + hidden_states``, fused into the next norm (which keeps its normed result) where it can be."""
        nxt = self._next_norm(residual)
        if nxt is None:
            return residual + hidden_states
        normed, out = nxt.forward_add(hidden_states, residual)
        nxt.__dict__["_litespark_prenormed"] = (out, normed)
        return out

    def _next_norm(self, residual: torch.Tensor):
        link = self.__dict__.get("_litespark_next")
        if link is None:
            return None
        norm, layer = link
        if (self.training and (self.gradient_checkpointing or getattr(layer, "gradient_checkpointing", False))) \
                or torch.compiler.is_compiling():
            return None
        w = norm.weight
        # the next layer may be another FSDP / ZeRO-3 unit whose weights are still sharded here, or on another device
        if not _plain_tensor(w) or w.shape[0] != residual.shape[-1] or w.device != residual.device:
            return None
        return norm


def link_decoder_layers(model: nn.Module) -> int:
    """Give each Litespark decoder layer the norm that reads its output (see `LitesparkDecoderLayer`)."""
    n = 0
    for owner in model.modules():
        layers = getattr(owner, "layers", None)
        if not isinstance(layers, nn.ModuleList) or not len(layers) \
                or not all(isinstance(m, LitesparkDecoderLayer) for m in layers):
            continue
        nexts = [(nl.input_layernorm, nl) for nl in list(layers)[1:]] + [(getattr(owner, "norm", None), None)]
        for layer, (norm, next_layer) in zip(layers, nexts):
            if isinstance(norm, LitesparkRMSNorm):
                layer.__dict__["_litespark_next"] = (norm, next_layer)
                n += 1
    return n


def unlink_decoder_layers(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop("_litespark_next", None)
        m.__dict__.pop("_litespark_prenormed", None)
