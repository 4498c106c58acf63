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
