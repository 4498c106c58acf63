"""`apply` and `restore`: turn a Hugging Face model into its Litespark version in place, and back.

`apply(model)` (1) selects the ``litespark`` attention backend and (2) swaps the classes of the modules listed for the
model's architecture in `litespark_hf.architectures` (norms, MLP, attention/RoPE, loss), in place: weights are shared,
never copied, applying twice changes nothing, PEFT-wrapped models are handled through their base model.
"""

from __future__ import annotations

import logging
import warnings

import torch.nn as nn

from . import checkpointing, generic, graphs, unpadding
from .architectures import SUPPORTED_MODEL_TYPES, SWAP_KINDS, get_architecture
from .attention import ATTENTION_NAME, partial_attention_problem, position_pre_hook, register, set_attention_cudnn
from .casting import link_cast_owners, set_fp8, unlink_cast_owners
from .config import LitesparkConfig
from .model_utils import decoder_layers, unwrap_model
from .modules import (
    LitesparkCausalLM, LitesparkEmbedding, LitesparkLMHead, link_decoder_layers, link_norm_consumers, original_class,
    swapped_class, unlink_decoder_layers, unlink_norm_consumers,
)
from .sharding import (maybe_register_zero3, unmark_zero3_layer_units, unregister_zero3_fused_weights,
                       zero3_layer_unit_count)

logger = logging.getLogger(__name__)

_STATE_ATTR = "_litespark_state"
_HOOK_ATTR = "_litespark_position_hook"
_UNPAD_ATTR = "_litespark_unpad_hooks"


class UnsupportedArchitectureError(ValueError):
    """Raised by `apply` for a model type outside the architecture table (unless ``allow_partial=True``)."""


def apply(model: nn.Module, config: LitesparkConfig | dict | str | None = None, **overrides) -> nn.Module:
    """Rewrite ``model`` (a transformers causal LM, optionally PEFT-wrapped) with Litespark layers, in place.

    Args:
        model: the model; returned as given (the same object).
        config: a `LitesparkConfig`, a dict or JSON string of its fields, or None for the defaults.
        **overrides: `LitesparkConfig` fields, e.g. ``apply(model, fused_cross_entropy=False)``.

    Raises:
        UnsupportedArchitectureError: the model type is not in the table, ``allow_partial`` is False, and the generic
            path (`litespark_hf.generic`) cannot take the model.
    """
    cfg = LitesparkConfig.from_any(config)
    if overrides:
        cfg = LitesparkConfig.from_any({**cfg.to_dict(), **overrides})
    base = unwrap_model(model)
    hf_config = getattr(base, "config", None)
    model_type = getattr(hf_config, "model_type", None)
    arch = get_architecture(model_type) if model_type else None
    generic_plan = None
    if arch is None:
        message = (
            f"litespark supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r} "
            f"({type(base).__name__})."
        )
        problem = partial_attention_problem(hf_config) if cfg.attention else None
        if problem:  # the backend would never see this feature: refuse rather than compute a different attention
            raise UnsupportedArchitectureError(message + (" allow_partial=True, but " if cfg.allow_partial else " ")
                                               + problem)
        if not cfg.allow_partial:  # the generic path (litespark_hf.generic), or the error
            generic_plan, why = generic.plan(base, cfg) if cfg.generic else (None, "generic=False.")
            if generic_plan is None:
                raise UnsupportedArchitectureError(
                    f"{message} {why} Pass allow_partial=True (LitesparkConfig) to use the litespark attention "
                    "backend alone."
                )

    register()
    state = base.__dict__.get(_STATE_ATTR) or {"attn_implementation": hf_config._attn_implementation}
    if cfg.attention and hf_config._attn_implementation != ATTENTION_NAME:
        base.set_attn_implementation(ATTENTION_NAME)
        if hf_config._attn_implementation != ATTENTION_NAME:  # transformers only logs a warning
            raise UnsupportedArchitectureError(
                f"{type(base).__name__} does not route its attention through transformers' AttentionInterface, so "
                f"the litespark attention backend cannot be switched on (it stays {hf_config._attn_implementation!r})."
            )
    if arch is None and generic_plan is None:
        warnings.warn(message + " allow_partial=True: only the attention backend is switched.", stacklevel=2)

    counts: dict[str, int] = {}
    if generic_plan is not None:
        generic.warn_once(generic_plan)
        counts = generic.swap(base, generic_plan)
        state["generic"] = generic_plan.report()
    if arch is not None:
        wanted = {cls: kind for cls, kind in arch.resolve().items() if getattr(cfg, SWAP_KINDS[kind][0])}
        for module in base.modules():
            if original_class(module) is not None:
                continue  # already swapped
            kind = wanted.get(type(module))
            if kind is None:
                continue
            causal_lm = issubclass(SWAP_KINDS[kind][1], LitesparkCausalLM)  # the loss swap (any family's variant)
            if causal_lm and "forward" in module.__dict__:
                # TRL's SFT/DPO trainers patch forward with their own chunked LM head; keep theirs.
                logger.info("litespark: %s.forward is patched (TRL fused LM head); keeping it", type(module).__name__)
                continue
            module.__class__ = swapped_class(SWAP_KINDS[kind][1], type(module))
            counts[kind] = counts.get(kind, 0) + 1
            if causal_lm and type(module.lm_head) is nn.Linear:
                module.lm_head.__class__ = swapped_class(LitesparkLMHead, nn.Linear)
                embed = module.get_input_embeddings()
                if type(embed) is nn.Embedding and embed.weight is module.lm_head.weight:  # tied
                    embed.__class__ = swapped_class(LitesparkEmbedding, nn.Embedding)
                    counts["tied_embedding"] = counts.get("tied_embedding", 0) + 1
        link_norm_consumers(base)
        link_cast_owners(base)
        link_decoder_layers(base)
        # DeepSpeed ZeRO-3: the fused modules gather their children's weights; each layer one leaf module
        maybe_register_zero3(base, layer_units=cfg.zero3_layer_units)
        leaves = zero3_layer_unit_count(base)
        if leaves:  # reported with the swaps (the bench rows' litespark_swapped)
            counts["zero3_layer_units"] = leaves
        if cfg.attention and _HOOK_ATTR not in base.__dict__:
            # positions made by us need no packed-document check (a host sync per forward; see _OwnPositions)
            stack = _decoder_stack(base)
            base.__dict__[_HOOK_ATTR] = stack.register_forward_pre_hook(position_pre_hook, with_kwargs=True)
            if cfg.unpad:  # padded batches: the decoder runs on the real tokens only (after the position hook)
                base.__dict__[_UNPAD_ATTR] = unpadding.install(stack, base)
    if arch is not None or generic_plan is not None:  # how many layers gradient checkpointing recomputes
        checkpointing.install(_decoder_stack(base), base, cfg.checkpoint_layers)
    # set to this config's values, so that applying again with another config takes the new one
    set_attention_cudnn(base, cfg.attention_cudnn and cfg.attention)
    if cfg.cuda_graphs and arch is not None and not cfg.compile_layers:  # compiled layers: no Python to replace
        graphs.install(base)
    else:
        graphs.uninstall(base)
    if cfg.compile_layers:
        compile_layers(base)
    else:
        uncompile_layers(base)
    if set_fp8(base, cfg.fp8) == 0 and cfg.fp8:
        warnings.warn("litespark: fp8=True, but no projection of this model runs through Litespark's fused "
                      "projections (all of them were left stock); it trains without float8", stacklevel=2)
    if cfg.sat_omission_rate_mlp > 0 or cfg.sat_omission_rate_heads > 0:
        from .sat import enable_sat  # Sparsity-Accelerated Training on top of the Litespark layers

        enable_sat(model, cfg)
    state["config"] = cfg.to_dict()
    state["swapped"] = {**state.get("swapped", {}), **counts}
    base.__dict__[_STATE_ATTR] = state
    logger.info("litespark applied to %s: %s", type(base).__name__, counts)
    return model


def _decoder_stack(base: nn.Module) -> nn.Module:
    """The decoder stack a causal LM's forward runs (``base.base_model``; the model itself when it has none)."""
    stack = getattr(base, "base_model", None)
    return stack if isinstance(stack, nn.Module) else base


def compile_layers(base: nn.Module) -> int:
    """`LitesparkConfig.compile_layers`: each decoder layer compiled in place (``nn.Module.compile``, dynamic
    shapes; the backend from ``LITESPARK_COMPILE_BACKEND``, default ``inductor``). Returns how many."""
    import os

    backend = os.environ.get("LITESPARK_COMPILE_BACKEND", "inductor")
    layers = decoder_layers(base)
    for layer in layers:
        if getattr(layer, "_compiled_call_impl", None) is None:
            layer.compile(dynamic=True, backend=backend)
            layer.__dict__[_COMPILED_ATTR] = True
    return len(layers)


_COMPILED_ATTR = "_litespark_compiled"


def uncompile_layers(base: nn.Module) -> None:
    """Undo `compile_layers` (a layer the user compiled is left compiled)."""
    for layer in decoder_layers(base):
        if layer.__dict__.pop(_COMPILED_ATTR, False):
            layer._compiled_call_impl = None


def restore(model: nn.Module) -> nn.Module:
    """Undo `apply` (and SAT): stock classes and the attention implementation the model had before."""
    from .sat import disable_sat

    disable_sat(model)
    base = unwrap_model(model)
    unlink_norm_consumers(base)
    unlink_cast_owners(base)
    set_attention_cudnn(base, False)
    uncompile_layers(base)
    checkpointing.uninstall(base)
    unlink_decoder_layers(base)
    graphs.uninstall(base)
    unregister_zero3_fused_weights(base)
    unmark_zero3_layer_units(base)
    hook = base.__dict__.pop(_HOOK_ATTR, None)
    if hook is not None:
        hook.remove()
    for hook in base.__dict__.pop(_UNPAD_ATTR, ()):
        hook.remove()
    for module in base.modules():
        original = original_class(module)
        if original is not None:
            module.__class__ = original
    state = base.__dict__.pop(_STATE_ATTR, None)
    if state is not None and base.config._attn_implementation != state["attn_implementation"]:
        base.set_attn_implementation(state["attn_implementation"])
    return model


def is_applied(model: nn.Module) -> bool:
    return _STATE_ATTR in unwrap_model(model).__dict__


def swapped_counts(model: nn.Module) -> dict[str, int]:
    """How many modules of each swap kind `apply` replaced (empty if not applied)."""
    state = unwrap_model(model).__dict__.get(_STATE_ATTR)
    return dict(state["swapped"]) if state else {}
