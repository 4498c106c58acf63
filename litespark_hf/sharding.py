"""Litespark's fused modules on sharded parameters (FSDP2, DeepSpeed ZeRO-3).

A fused module reads the weights of child modules it never calls: the attention's q/k/v and output projections
(one `litespark_kernels.fused_linear` GEMM for q/k/v), the gated MLP's gate/up/down projections, StarCoder2's c_fc
and c_proj. What each engine does about that:

- **FSDP2** (``fully_shard``) gathers a whole unit before its forward (and again before its backward): with
  accelerate's per-decoder-layer units every projection of a layer is a plain ``nn.Parameter`` while the layer runs,
  so the fused GEMMs get full weights with nothing to register (`litespark_kernels.ops.linear._plain_tensor`).
- **DeepSpeed ZeRO-3** gathers, in a module's pre-forward (and pre-backward) hook, that module's own parameters and
  the ones registered on it with ``deepspeed.zero.register_external_parameter`` - the documented mechanism for "a
  parameter accessed outside of its owning module's forward". `register_zero3_fused_weights` registers each fused
  module's child projection weights (and biases) on the fused module, so its hook gathers them (prefetched like any
  other module's, by DeepSpeed's trace) and releases them after it; `fused_linear` then takes the fused path on them
  (`litespark_kernels.ops.linear._gathered`). Without the registration DeepSpeed's run-time discovery gathers such
  a parameter synchronously when the attribute is first read in a forward, and registers it on the innermost
  running module itself. The LM head needs nothing: the fused cross-entropy runs inside the head's own forward.

`litespark_hf.apply` calls `register_zero3_fused_weights` when ZeRO-3 is in use (the model's parameters are already
ZeRO-3 parameters, from ``deepspeed.zero.Init``, or transformers' DeepSpeed config says stage 3, as under
``accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml``); a training loop that converts the model
later (``deepspeed.initialize`` without ``zero.Init`` or transformers' config) calls it itself before that.

With ``LitesparkConfig.zero3_layer_units`` (default) `apply` also makes each Litespark decoder layer a ZeRO-3 leaf
module (`mark_zero3_layer_units`): DeepSpeed then hooks, fetches and releases per layer instead of per sub-module.
"""

from __future__ import annotations

import torch.nn as nn

_REGISTERED = "_litespark_zero3_external"  # module.__dict__: the parameters registered on that module
_LEAF = "_litespark_zero3_leaf"  # module.__dict__: True where mark_zero3_layer_units made the layer a leaf


def zero3_enabled(model: nn.Module | None = None) -> bool:
    """True when DeepSpeed ZeRO-3 partitions (or will partition) ``model``'s parameters: one of them is a ZeRO-3
    parameter already, or transformers' DeepSpeed configuration (a Trainer's ``deepspeed`` argument, accelerate's
    DeepSpeed plugin) is at stage 3."""
    if model is not None and any(hasattr(p, "ds_id") for p in model.parameters()):
        return True
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers without the integration module
        return False
    return bool(is_deepspeed_zero3_enabled())


def fused_child_parameters(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(fused module, [parameters of its children that its fused forward reads]) for every Litespark module with
    projection groups (``litespark_cast_groups``); a module's own parameters (the LM head's) are left out."""
    found = []
    for module in model.modules():
        groups = getattr(module, "litespark_cast_groups", None)
        if groups is None:
            continue
        own = {id(p) for p in module.parameters(recurse=False)}
        params, seen = [], set()
        for linears in groups().values():
            for lin in linears:
                for p in (lin.weight, lin.bias):
                    if isinstance(p, nn.Parameter) and id(p) not in own and id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
        if params:
            found.append((module, params))
    return found


def register_zero3_fused_weights(model: nn.Module) -> int:
    """Register every fused module's child projection parameters on it with
    ``deepspeed.zero.register_external_parameter`` (see the module docstring); returns how many were registered
    (again: 0). Needs DeepSpeed; a no-op for a module already registered."""
    import deepspeed

    n = 0
    for module, params in fused_child_parameters(model):
        done = module.__dict__.setdefault(_REGISTERED, {})
        for p in params:
            if id(p) not in done:
                deepspeed.zero.register_external_parameter(module, p)
                done[id(p)] = p
                n += 1
    return n


def unregister_zero3_fused_weights(model: nn.Module) -> None:
    """Undo `register_zero3_fused_weights` (`litespark_hf.restore`)."""
    for module in model.modules():
        done = module.__dict__.pop(_REGISTERED, None)
        if not done:
            continue
        import deepspeed

        for p in done.values():
            try:
                deepspeed.zero.unregister_external_parameter(module, p)
            except RuntimeError:  # DeepSpeed dropped it already
                pass


def mark_zero3_layer_units(model: nn.Module) -> int:
    """Make the Litespark decoder layers of ``model`` DeepSpeed ZeRO-3 leaf modules (``LitesparkConfig.
    zero3_layer_units``), each one whose input needs a gradient (see below); returns how many were marked.

    DeepSpeed registers its fetch / release hooks on every module of the model, recursively, when the engine is built;
    a leaf module gets them and its children do not: its pre-forward (pre-backward) hook gathers the parameters of its
    whole subtree in one coalesced fetch, and its gradients are reduced from one full backward hook on it instead of
    one hook per parameter (``deepspeed.utils.set_z3_leaf_modules``; DeepSpeed's documented use: MoE layers and
    "models with excessively fine-grained nested modules"). A Litespark layer's fused forward reads its projections'
    weights without calling them, so nothing is lost by gathering them together; stock layers keep DeepSpeed's
    per-module hooks. A layer that already carries DeepSpeed's hooks (``ds_id``: the engine was built) or a leaf flag
    of its own (set by the user or by DeepSpeed's ``stage3_module_granularity_threshold``) is left as it is."""
    from deepspeed.utils import set_z3_leaf_module

    from .modules.decoder import LitesparkDecoderLayer

    n = 0
    for owner in model.modules():
        layers = getattr(owner, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        # DeepSpeed reduces a leaf's gradients from a full backward hook on it, which fires once the gradient of the
        # layer's input is computed - or, when that input needs no gradient, as soon as the output's gradient
        # arrives, before the layer's own weight gradients exist (DeepSpeed then reduces zeros and re-partitions
        # the weights the backward still accumulates into). So a layer is a leaf only where a trainable weight
        # upstream (the input embedding, an earlier layer) makes its input need a gradient; with a frozen embedding
        # (LoRA) the first layer keeps DeepSpeed's per-module hooks.
        embed = getattr(owner, "embed_tokens", None)
        upstream = isinstance(embed, nn.Module) and any(p.requires_grad for p in embed.parameters())
        for layer in layers:
            if upstream and isinstance(layer, LitesparkDecoderLayer) and not hasattr(layer, "ds_id") \
                    and "_z3_leaf" not in vars(layer):
                set_z3_leaf_module(layer, True)
                layer.__dict__[_LEAF] = True
                n += 1
            upstream = upstream or any(p.requires_grad for p in layer.parameters())
    return n


def zero3_layer_unit_count(model: nn.Module) -> int:
    """How many layers `mark_zero3_layer_units` has made leaf modules in ``model``."""
    return sum(1 for m in model.modules() if m.__dict__.get(_LEAF))


def unmark_zero3_layer_units(model: nn.Module) -> None:
    """Undo `mark_zero3_layer_units` (`litespark_hf.restore`): the flags it set, and only those."""
    for module in model.modules():
        if module.__dict__.pop(_LEAF, None):
            module.__dict__.pop("_z3_leaf", None)


def maybe_register_zero3(model: nn.Module, layer_units: bool = True) -> int:
    """When ZeRO-3 is in use (`zero3_enabled`): `register_zero3_fused_weights`, and `mark_zero3_layer_units` if
    ``layer_units``; else nothing. Returns the count of registered weights."""
    if not zero3_enabled(model):
        return 0
    n = register_zero3_fused_weights(model)
    if layer_units:
        mark_zero3_layer_units(model)
    else:  # applied again with the option off
        unmark_zero3_layer_units(model)
    return n


def set_fsdp2_forward_prefetch(model: nn.Module) -> int:
    """``LitesparkConfig.fsdp2_forward_prefetch``: in every stack of Litespark decoder layers that are each an FSDP2
    unit (``fully_shard``; accelerate's TRANSFORMER_BASED_WRAP), let each layer prefetch the next one's all-gather
    (``FSDPModule.set_modules_to_forward_prefetch([next])``, issued after the layer's own all-gather copy-out).
    FSDP2's default issues a unit's all-gather in that unit's pre-forward hook, so the gather overlaps the previous
    layer's compute only as far as the host is ahead of the GPU. A layer with a prefetch list already is left as it
    is. Returns how many layers were given one."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return 0
    from .modules.decoder import LitesparkDecoderLayer

    n = 0
    for owner in model.modules():
        layers = getattr(owner, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) < 2 \
                or not all(isinstance(m, FSDPModule) and isinstance(m, LitesparkDecoderLayer) for m in layers):
            continue
        for layer, nxt in zip(layers, list(layers)[1:]):
            if getattr(layer._get_fsdp_state(), "_states_to_forward_prefetch", None):
                continue
            layer.set_modules_to_forward_prefetch([nxt])
            n += 1
    return n
