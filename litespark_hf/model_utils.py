"""Helpers on models that `patching` and `sat` both use (kept apart so that neither imports the other)."""

from __future__ import annotations

import torch.nn as nn


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP-style wrappers."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "config"):
            model = model.module
        else:
            break
    return model


def decoder_layers(base: nn.Module) -> list[nn.Module]:
    """Decoder layers in order: modules that have both ``self_attn`` and ``mlp``."""
    return [m for m in base.modules() if isinstance(getattr(m, "self_attn", None), nn.Module)
            and isinstance(getattr(m, "mlp", None), nn.Module)]


def set_module_flag(model: nn.Module, attr: str, enabled: bool, wants) -> int:
    """Set ``module.__dict__[attr] = True`` on every module of ``model`` for which ``wants(module)`` holds (and remove
    it from every other one), or remove it everywhere when not ``enabled``. Returns how many modules carry it."""
    marked = 0
    for m in model.modules():
        if enabled and wants(m):
            m.__dict__[attr] = True
            marked += 1
        else:
            m.__dict__.pop(attr, None)
    return marked
