"""Litespark versions of Hugging Face modules, applied by swapping an instance's class in place.

Each mixin here is combined with the Hugging Face class it replaces (``Litespark<Name>(Mixin, <Name>)``) and the
instance's ``__class__`` is pointed at that subclass: parameters, buffers, hooks, PEFT/LoRA wrappers and state-dict
keys stay exactly as they were (nothing is copied), and `restore` points ``__class__`` back.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import activations as hf_activations
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import litespark_kernels as lk
from litespark_kernels._dispatch import autocast_dtype, warn_once
from litespark_kernels.ops.linear import _plain_tensor, weight_views

GELUTanh = hf_activations.GELUTanh
SiLUActivation = getattr(hf_activations, "SiLUActivation", nn.SiLU)  # not in every transformers 5.x

_SWAPPED: dict[tuple[type, type], type] = {}


def swapped_class(mixin: type, original: type) -> type:
    """The (cached) class ``Litespark<original>`` = mixin + original (decoder layers keep the stock name)."""
    key = (mixin, original)
    if key not in _SWAPPED:
        name = original.__name__ if mixin is LitesparkDecoderLayer else f"Litespark{original.__name__}"
        cls = type(name, (mixin, original), {"__litespark_original__": original})
        cls.__module__ = __name__
        _SWAPPED[key] = cls
    return _SWAPPED[key]


def original_class(module: nn.Module) -> type | None:
    """The stock class of a swapped module, or None if the module was not swapped."""
    return type(module).__dict__.get("__litespark_original__")


class LitesparkRMSNorm:
    """transformers' RMSNorm (``weight``, ``variance_epsilon``) through `litespark_kernels.rms_norm`.

    A decoder layer's input and post-attention norms are linked by `link_norm_consumers` to the attention / MLP they
    feed. Under autocast, when that consumer runs its projections through `fused_linear` (which casts its input to
    the autocast dtype first), the norm writes the autocast dtype directly: the same values as stock's fp32 output
    cast by autocast, half the bytes, and no separate cast kernel.
    """

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
        # (`LitesparkDecoderLayer`): used only for that very tensor.
        stash = self.__dict__.pop("_litespark_prenormed", None)
        if stash is not None and stash[0] is hidden_states:
            return stash[1]
        return lk.rms_norm(hidden_states, self.weight, self.variance_epsilon,
                           out_dtype=self._out_dtype(hidden_states.dtype, hidden_states.device.type))

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(residual + x), residual + x)`` with the add fused into the norm (`LitesparkDecoderLayer`)."""
        out_dtype = self._out_dtype(torch.promote_types(x.dtype, residual.dtype), x.device.type)
        return lk.add_rms_norm(x, residual, self.weight, self.variance_epsilon, out_dtype=out_dtype)


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

    The class keeps the stock class's name (FSDP's and accelerate's wrap policies find decoder layers by class
    name). The stock forward runs instead when the post-attention norm is not a Litespark RMSNorm or has hooks.
    """

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False,
                position_embeddings=None, **kwargs):
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
        hidden_states, residual = post.forward_add(hidden_states, residual)
        hidden_states = self.mlp(hidden_states)
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


def link_norm_consumers(model: nn.Module) -> int:
    """Link each decoder layer's norms to the Litespark attention / gated MLP they feed (see `LitesparkRMSNorm`)."""
    n = 0
    for m in model.modules():
        for norm_name, consumer_name in (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")):
            norm, consumer = getattr(m, norm_name, None), getattr(m, consumer_name, None)
            if isinstance(norm, LitesparkRMSNorm) and hasattr(consumer, "litespark_casts_input"):
                norm.__dict__["_litespark_consumer"] = weakref.ref(consumer)
                n += 1
    return n


def unlink_norm_consumers(model: nn.Module) -> None:
    for m in model.modules():
        m.__dict__.pop("_litespark_consumer", None)


class LitesparkLayerNorm:
    """``nn.LayerNorm`` over the last dimension through `litespark_kernels.layer_norm`."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return F.layer_norm(hidden_states, self.normalized_shape, self.weight, self.bias, self.eps)
        return lk.layer_norm(hidden_states, self.weight, self.bias, self.eps)


def fused_gated_activation(act: nn.Module, packed: bool = False):
    """The fused kernel for a gated MLP's activation module (SiLU -> SwiGLU, GELU-tanh -> GeGLU), or None.

    ``packed``: the version taking one fused gate+up output (`litespark_kernels.swiglu_packed`).
    """
    if isinstance(act, (nn.SiLU, SiLUActivation)):
        return lk.swiglu_packed if packed else lk.swiglu
    if isinstance(act, GELUTanh):
        return lk.geglu_packed if packed else lk.geglu
    return None


def plain_linears(*modules: nn.Module) -> bool:
    """True when every module is exactly ``nn.Linear`` (not a LoRA/quantised wrapper, no subclass).

    Such projections are run through `litespark_kernels.fused_linear` (one GEMM per group of projections that read
    the same input); anything else is called as a module, so adapters and hooks keep working.
    """
    return all(type(m) is nn.Linear for m in modules)


def project(x: torch.Tensor, *linears: nn.Linear, cast: torch.Tensor | None = None) -> torch.Tensor:
    """``cat([lin(x) for lin in linears], -1)`` through `litespark_kernels.fused_linear` (plain ``nn.Linear`` only).

    ``cast``: these weights already cast for this forward (`cast_projection_weights`), or None."""
    return lk.fused_linear(x, [m.weight for m in linears], [m.bias for m in linears], cast)


def _cast_of(module: nn.Module, slot: str) -> torch.Tensor | None:
    casts = module.__dict__.get("_litespark_casts")
    return None if casts is None else casts.get(slot)


def link_cast_owners(model: nn.Module) -> int:
    """Record on ``model`` the Litespark modules whose projection weights `cast_projection_weights` casts."""
    owners = [m for m in model.modules() if hasattr(m, "litespark_cast_groups")]
    model.__dict__["_litespark_cast_owners"] = owners
    # transformers sets ``gradient_checkpointing`` on each decoder layer (and the model) it checkpoints
    model.__dict__["_litespark_gc_flags"] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    return len(owners)


def unlink_cast_owners(model: nn.Module) -> None:
    detach_cast_shadow(model)
    model.__dict__.pop("_litespark_cast_owners", None)
    model.__dict__.pop("_litespark_gc_flags", None)


def _cast_slots(model: nn.Module):
    """([(module, slot)], [linears per slot], device) of every fused projection group, or None when the weights are
    spread over devices (device_map), sharded (FSDP/ZeRO-3), of mixed dtypes, or there are none."""
    owners = model.__dict__.get("_litespark_cast_owners")
    if not owners:
        return None
    slots, groups, device = [], [], None
    for m in owners:
        for slot, linears in m.litespark_cast_groups().items():
            ws = [lin.weight for lin in linears]
            dtype = ws[0].dtype
            if device is None:
                device = ws[0].device
            if any(w.device != device or w.dtype != dtype or not _plain_tensor(w) for w in ws):
                return None
            slots.append((m, slot))
            groups.append(linears)
    if device is None:
        return None
    return slots, groups, device


def _weights(linear_groups) -> list[list[torch.Tensor]]:
    return [[lin.weight for lin in g] for g in linear_groups]


def _give_casts(slots, views) -> list[nn.Module]:
    given = []
    for (m, slot), view in zip(slots, views):
        casts = m.__dict__.get("_litespark_casts")
        if casts is None:
            casts = m.__dict__["_litespark_casts"] = {}
            given.append(m)
        casts[slot] = view
    return given


def cast_projection_weights(model: nn.Module, device_type: str) -> list[nn.Module]:
    """Cast every fused projection group's weights (and the Litespark LM head's) to the autocast dtype at once
    (`litespark_kernels.cast_weights`).

    Stock autocast casts each Linear's fp32 weight when the Linear runs (one kernel launch per projection per
    forward, ~112 for a 16-layer Llama); this makes one buffer and one ``_foreach_copy_`` at the start of the
    forward, and the layers read their views (same values). Only under autocast, with every weight on one device,
    outside ``torch.compile`` and without gradient checkpointing (whose recomputation would keep the whole buffer
    alive through the forward). Where `LitesparkAdamW` keeps a `CastShadow` of these weights (written as it updates
    them), its views are handed out instead: no cast at all (gradient checkpointing included, the buffer lives
    anyway). Returns the modules given casts; `drop_casts` must clear them after the forward.
    """
    dtype = autocast_dtype(device_type)
    if dtype is None or torch.compiler.is_compiling():
        return []
    shadow = model.__dict__.get("_litespark_shadow")
    if shadow is not None:
        if shadow.usable(model, dtype, device_type):
            if not shadow.consistent():  # a weight changed outside LitesparkAdamW (load_state_dict, ...)
                shadow.fill()
            return _give_casts(shadow.slots, shadow.views)
        if not shadow.alive:
            model.__dict__.pop("_litespark_shadow", None)
    if any(getattr(m, "gradient_checkpointing", False) for m in model.__dict__.get("_litespark_gc_flags", ())):
        return []
    found = _cast_slots(model)
    if found is None or found[2].type != device_type:
        return []  # spread over devices (device_map), sharded, or mixed dtypes: per-call casts
    slots, groups, _ = found
    return _give_casts(slots, lk.cast_weights(_weights(groups), dtype))


class CastShadow:
    """Low-precision copies of the fused projection weights (and the Litespark LM head's, read by the fused loss)
    that persist across steps.

    `LitesparkAdamW` writes ``bf16(w)`` (or fp16) into them as it updates each weight, so the next forward reads
    them instead of casting every weight again (`cast_projection_weights`). They are trusted only while every weight
    is still the tensor it was and has the autograd version recorded after the last fill or optimizer step (a
    change through torch ops - ``load_state_dict``, ``copy_`` under ``no_grad``, another optimizer's for-loop
    update - bumps the version and triggers a refill before the next forward). The optimizer bumps the versions of
    the weights it updates and of this buffer, so a graph that saved weights or casts before the step and is
    backpropagated after it fails loudly, as with torch's own in-place updates.

    Caveat: an in-place update that neither goes through `LitesparkAdamW` nor bumps versions (e.g. a second
    *fused* torch optimizer over the same weights, or writes through ``.data``) is not seen; call `fill()` after
    one.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        found = _cast_slots(model)
        if found is None:
            raise ValueError("no fused projection weights on one device to shadow")
        self.slots, linear_groups, self.device = found
        self.dtype = dtype
        self.owners = model.__dict__.get("_litespark_cast_owners")
        self._groups = _weights(linear_groups)
        self.views = lk.cast_weights(self._groups, dtype)
        self.flat = self.views[0]._base if self.views[0]._base is not None else self.views[0]
        self.params: list[torch.Tensor] = [w for g in self._groups for w in g]
        self._linears = [(lin, lin.weight) for g in linear_groups for lin in g]
        self.param_views = dict(zip(self.params, weight_views(self.views, self._groups)))
        self.alive = True
        self._versions: list[int] | None = None
        self._record()

    def usable(self, model: nn.Module, dtype: torch.dtype, device_type: str) -> bool:
        """Whether these copies stand for ``model``'s current weights in ``dtype`` (else the forward casts)."""
        if not self.alive:
            return False
        if model.__dict__.get("_litespark_cast_owners") is not self.owners \
                or any(lin.weight is not w for lin, w in self._linears):
            self.alive = False  # the model was re-patched or a weight replaced: this buffer is stale for good
            return False
        return dtype == self.dtype and self.device.type == device_type

    def _record(self) -> None:
        self._versions = [p._version for p in self.params]

    def consistent(self) -> bool:
        """True when no weight changed since the last `fill` or `stepped`."""
        versions = self._versions
        return versions is not None and all(p._version == v for p, v in zip(self.params, versions))

    def fill(self) -> None:
        """Copy every weight into its shadow (in place; a graph that saved the old values will refuse to run)."""
        lk.cast_weights(self._groups, self.dtype, out=self.views)
        self._record()

    def stepped(self) -> None:
        """Called by the optimizer after it wrote new weights and their shadows."""
        torch.autograd.graph.increment_version(self.flat)
        self._record()


def attach_cast_shadow(model: nn.Module, dtype: torch.dtype) -> CastShadow | None:
    """Give ``model`` a `CastShadow` (for an optimizer that keeps it current); None where there is nothing to shadow."""
    try:
        shadow = CastShadow(model, dtype)
    except ValueError:
        return None
    model.__dict__["_litespark_shadow"] = shadow
    return shadow


def detach_cast_shadow(model: nn.Module) -> None:
    shadow = model.__dict__.pop("_litespark_shadow", None)
    if shadow is not None:
        shadow.alive = False


def drop_casts(modules: list[nn.Module]) -> None:
    for m in modules:
        m.__dict__.pop("_litespark_casts", None)


class LitesparkGatedMLP:
    """``down(act(gate(x)) * up(x))`` with the activation and the product fused (SwiGLU / GeGLU).

    Plain ``nn.Linear`` projections run as one gate+up GEMM (`litespark_kernels.fused_linear`) and the packed
    activation; wrapped ones (LoRA) are called as modules, so adapters keep training.
    """

    def _packed_activation(self):
        """The packed activation kernel when forward takes the fused path (plain projections), else None."""
        if plain_linears(self.gate_proj, self.up_proj, self.down_proj):
            return fused_gated_activation(self.act_fn, packed=True)
        return None

    def litespark_casts_input(self) -> bool:
        """True when forward feeds its input only to `fused_linear` (so a low-precision input changes nothing)."""
        return self._packed_activation() is not None

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The projection groups forward runs through `fused_linear` (for `cast_projection_weights`)."""
        if self.litespark_casts_input():
            return {"gate_up": [self.gate_proj, self.up_proj], "down": [self.down_proj]}
        return {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self._packed_activation()
        if packed is not None:  # gate and up as one GEMM, one gradient for both
            gate_up = project(x, self.gate_proj, self.up_proj, cast=_cast_of(self, "gate_up"))
            return project(packed(gate_up), self.down_proj, cast=_cast_of(self, "down"))
        act = fused_gated_activation(self.act_fn)
        if act is None:
            warn_once("gated_mlp", f"activation {type(self.act_fn).__name__} has no fused kernel")
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(act(self.gate_proj(x), self.up_proj(x)))


class LitesparkGeluMLP:
    """StarCoder2's MLP: ``dropout(c_proj(gelu_tanh(c_fc(x))))`` with c_fc's bias fused into the activation."""

    def _fused_fc(self) -> bool:
        """c_fc runs through `fused_linear` with its bias fused into the GELU kernel (else: stock order)."""
        return type(self.c_fc) is nn.Linear and isinstance(self.act, GELUTanh)

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The projections forward runs through `fused_linear` (for `cast_projection_weights`)."""
        groups = {}
        if self._fused_fc():
            groups["c_fc"] = [self.c_fc]
        if plain_linears(self.c_proj):
            groups["c_proj"] = [self.c_proj]
        return groups

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        c_fc = self.c_fc
        if self._fused_fc():
            h = lk.gelu_tanh_bias(lk.fused_linear(hidden_states, [c_fc.weight], cast=_cast_of(self, "c_fc")),
                                  c_fc.bias)
        else:  # LoRA-wrapped c_fc or another activation: stock order, nothing fused
            h = self.act(c_fc(hidden_states))
        h = project(h, self.c_proj, cast=_cast_of(self, "c_proj")) if plain_linears(self.c_proj) else self.c_proj(h)
        return F.dropout(h, p=self.residual_dropout, training=self.training)


def _eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


class LitesparkAttention:
    """The decoder attention of Llama / Mistral / Qwen2 / Qwen3 / StarCoder2 with the RoPE kernel.

    Same steps as transformers' forward: projections (called as modules, LoRA-safe), optional per-head q/k norms
    (Qwen3), rotary embedding (`litespark_kernels.apply_rope`), KV cache update, the configured attention backend
    (``litespark`` after `apply`), output projection, optional residual dropout (StarCoder2).
    This class never uses a sliding window (Llama); the subclasses below read it where their family does.
    """

    def _sliding_window(self):
        return None

    def litespark_casts_input(self) -> bool:
        """True when forward feeds its input only to `fused_linear` (so a low-precision input changes nothing)."""
        return plain_linears(self.q_proj, self.k_proj, self.v_proj)

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The projection groups forward runs through `fused_linear` (for `cast_projection_weights`)."""
        groups = {}
        if self.litespark_casts_input():
            groups["qkv"] = [self.q_proj, self.k_proj, self.v_proj]
        if plain_linears(self.o_proj):
            groups["o"] = [self.o_proj]
        return groups

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        if self.litespark_casts_input():  # one GEMM for q, k and v
            sizes = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
            query_states, key_states, value_states = project(
                hidden_states, self.q_proj, self.k_proj, self.v_proj, cast=_cast_of(self, "qkv")).split(sizes, dim=-1)
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


class LitesparkLMHead:
    """``nn.Linear`` LM head that, given labels, returns the fused linear cross-entropy loss instead of logits.

    The loss is computed inside the head's own ``forward`` so that sharding wrappers which gather a module's
    parameters around its forward (DeepSpeed ZeRO-3, FSDP) see the weight used; without labels it is a plain linear.
    """

    def litespark_cast_groups(self) -> dict[str, list[nn.Linear]]:
        """The weight whose low-precision copy the fused loss reads (for `cast_projection_weights`)."""
        return {"lm_head": [self]}

    def forward(self, input, labels=None, shift_labels=None, num_items_in_batch=None, label_count=None,
                tied_grad=None):
        if labels is None and shift_labels is None:
            return F.linear(input, self.weight, self.bias)
        return lk.fused_linear_cross_entropy(
            input, self.weight, labels, bias=self.bias, shift_labels=shift_labels,
            num_items_in_batch=num_items_in_batch, label_count=label_count, tied_grad=tied_grad,
            weight_cast=_cast_of(self, "lm_head"),
        )


class LitesparkEmbedding:
    """Input embedding tied to a Litespark LM head: in a fused-loss training forward its weight gradient is added
    into the loss's weight gradient in place instead of being built as a second dense matrix and summed
    (`litespark_kernels.tied_embedding`). Every other call is the stock lookup."""

    def forward(self, input):
        slot = self.__dict__.get("_litespark_tied")
        if (slot is None or not torch.is_grad_enabled() or not self.weight.requires_grad or self.max_norm is not None
                or self.scale_grad_by_freq or self.sparse or torch.compiler.is_compiling()):
            return super().forward(input)
        return lk.tied_embedding(input, self.weight, self.padding_idx, slot)


class LitesparkCausalLM:
    """Causal-LM model whose training loss is the fused linear cross-entropy (no [tokens, vocab] logits).

    Used only in training with labels and a Litespark LM head; evaluation, generation and any other call run the
    stock forward (which returns logits). Honours ``shift_labels``, ``ignore_index=-100`` and ``num_items_in_batch``
    exactly like transformers' ``ForCausalLMLoss``.
    """

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        shift_labels = kwargs.get("shift_labels")
        fused = (
            self.training and (labels is not None or shift_labels is not None)
            and isinstance(self.lm_head, LitesparkLMHead)
        )
        if not fused:
            return super().forward(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                logits_to_keep=logits_to_keep, **kwargs,
            )
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        kwargs.pop("ignore_index", None)
        if shift_labels is None:
            shift_labels = lk.shifted_labels(labels)
        # started before the decoder so that the loss reads a finished copy instead of syncing (LabelCount)
        label_count = lk.count_labels(shift_labels) if shift_labels.is_cuda else None
        given = cast_projection_weights(self, self.lm_head.weight.device.type)
        embed = self.get_input_embeddings()
        tied = None
        if isinstance(embed, LitesparkEmbedding) and embed.weight is self.lm_head.weight:
            tied = embed.__dict__["_litespark_tied"] = lk.TiedGrad()  # this forward's hand-over slot
        try:
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
            )
            loss = self.lm_head(
                outputs.last_hidden_state, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                label_count=label_count, tied_grad=tied,
            )
        finally:
            drop_casts(given)
            if tied is not None:
                embed.__dict__.pop("_litespark_tied", None)
        return CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states, attentions=outputs.attentions,
        )
