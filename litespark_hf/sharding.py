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
"""

from __future__ import annotations

import torch.nn as nn

_REGISTERED = "_litespark_zero3_external"  # module.__dict__: the parameters registered on that module


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


def maybe_register_zero3(model: nn.Module) -> int:
    """`register_zero3_fused_weights` when ZeRO-3 is in use (`zero3_enabled`), else nothing; returns the count."""
    return register_zero3_fused_weights(model) if zero3_enabled(model) else 0
