"""RMSNorm and LayerNorm through the Litespark norm kernels; the links from a decoder layer's norms to the modules
they feed."""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

import litespark_kernels as lk
from litespark_kernels._dispatch import autocast_dtype


class LitesparkRMSNorm:
    """transformers' RMSNorm (``weight``, ``variance_epsilon``) through `litespark_kernels.rms_norm`.

    A decoder layer's input and post-attention norms are linked by `link_norm_consumers` to the attention / MLP they
    feed. Under autocast, when that consumer runs its projections through `fused_linear` (which casts its input to
    the autocast dtype first), the norm writes the autocast dtype directly: the same values as stock's fp32 output
    cast by autocast, half the bytes, and no separate cast kernel.

    Subclasses set ``_litespark_offset`` for Gemma's ``x_hat * (1 + weight)`` in fp32 (`LitesparkGemmaRMSNorm`).
    """

    _litespark_offset: float | None = None  # None: Llama's ``weight * x_hat.to(dtype)``

    def _litespark_eps(self) -> float:
        return self.variance_epsilon

    def _out_dtype(self, dtype: torch.dtype, device_type: str) -> torch.dtype | None:
        """The dtype to write a ``dtype`` result in: the autocast dtype when the consumer casts to it anyway."""
        ref = self.__dict__.get("_litespark_consumer")
        if ref is not None and dtype == torch.float32:
            cast_to = autocast_dtype(device_type)
            if cast_to is not None:
                consumer = ref()
                if consumer is not None and consumer.litespark_casts_input():
                    return cast_to
        return None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The previous decoder layer may have computed this norm of its output already, fused with its residual add
        # (`LitesparkDecoderLayer`): used only for that very tensor. Never under torch.compile, where no layer leaves
        # one (`LitesparkDecoderLayer._next_norm`) and ``__dict__.pop`` is a graph break (Dynamo of torch 2.11 traces
        # ``__dict__`` get/setitem/contains only); an eager stash left over is popped by the next eager call.
        if not torch.compiler.is_compiling():
            stash = self.__dict__.pop("_litespark_prenormed", None)
            if stash is not None and stash[0] is hidden_states:
                return stash[1]
        return lk.rms_norm(hidden_states, self.weight, self._litespark_eps(),
                           out_dtype=self._out_dtype(hidden_states.dtype, hidden_states.device.type),
                           offset=self._litespark_offset)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(residual + x), residual + x)`` with the add fused into the norm (`LitesparkDecoderLayer`)."""
        out_dtype = self._out_dtype(torch.promote_types(x.dtype, residual.dtype), x.device.type)
        return lk.add_rms_norm(x, residual, self.weight, self._litespark_eps(), out_dtype=out_dtype,
                               offset=self._litespark_offset)


class LitesparkLayerNorm:
    """``nn.LayerNorm`` over the last dimension through `litespark_kernels.layer_norm`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return F.layer_norm(hidden_states, self.normalized_shape, self.weight, self.bias, self.eps)
        return lk.layer_norm(hidden_states, self.weight, self.bias, self.eps)


def _norm_consumers(layer: nn.Module) -> tuple[tuple[str, str], ...]:
    """(norm, the module it feeds) of a decoder layer. With sandwich norms (Gemma2/3: a pre- and a post-feedforward
    norm) the post-attention norm feeds the residual add, not the MLP: its output must keep stock's dtype."""
    if hasattr(layer, "pre_feedforward_layernorm"):
        return (("input_layernorm", "self_attn"), ("pre_feedforward_layernorm", "mlp"))
    return (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp"))


def link_norm_consumers(model: nn.Module) -> int:
    """Link each decoder layer's norms to the Litespark attention / gated MLP they feed (see `LitesparkRMSNorm`)."""
    n = 0
    for m in model.modules():
        for norm_name, consumer_name in _norm_consumers(m):
            norm, consumer = getattr(m, norm_name, None), getattr(m, consumer_name, None)
            if isinstance(norm, LitesparkRMSNorm) and hasattr(consumer, "litespark_casts_input"):
                norm.__dict__["_litespark_consumer"] = weakref.ref(consumer)
                n += 1
    return n


def unlink_norm_consumers(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop("_litespark_consumer", None)
