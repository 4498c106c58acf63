"""Swapping an instance's class for ``Litespark<Name>`` (mixin + stock class), and the projection helpers the swapped
modules share."""

from __future__ import annotations

import torch
import torch.nn as nn

import litespark_kernels as lk

_SWAPPED: dict[tuple[type, type], type] = {}


def swapped_class(mixin: type, original: type) -> type:
    """The (cached) class ``Litespark<original>`` = mixin + original (decoder layers keep the stock name)."""
    key = (mixin, original)
    if key not in _SWAPPED:
        name = original.__name__ if vars(mixin).get("_litespark_keeps_name") else f"Litespark{original.__name__}"
        cls = type(name, (mixin, original), {"__litespark_original__": original})
        cls.__module__ = __package__  # "litespark_hf.modules": where the mixins are exported
        _SWAPPED[key] = cls
    return _SWAPPED[key]


def original_class(module: nn.Module) -> type | None:
    """The stock class of a swapped module, or None if the module was not swapped."""
    return type(module).__dict__.get("__litespark_original__")


def plain_linears(*modules: nn.Module) -> bool:
    """True when every module is exactly ``nn.Linear`` (not a LoRA/quantised wrapper, no subclass).

    Such projections are run through `litespark_kernels.fused_linear` (one GEMM per group of projections that read
    the same input); anything else is called as a module, so adapters and hooks keep working. A projection that is
    its own FSDP2 unit (class ``FSDPLinear``) is called as a module, so that its unshard hooks run; under FSDP2's
    usual per-layer units the projections stay ``nn.Linear`` and `fused_linear` gets their gathered weights.
    """
    return all(type(m) is nn.Linear for m in modules)


def project(x: torch.Tensor, *linears: nn.Linear, cast: torch.Tensor | None = None, fp8: bool = False) -> torch.Tensor:
    """``cat([lin(x) for lin in linears], -1)`` through `litespark_kernels.fused_linear` (plain ``nn.Linear`` only).

    ``cast``: these weights already cast for this forward (`cast_projection_weights`), or None; ``fp8``: the GEMMs
    in float8 (`litespark_hf.casting.projection` gives both)."""
    return lk.fused_linear(x, [m.weight for m in linears], [m.bias for m in linears], cast, fp8=fp8)
