"""Low-precision copies of the fused projection weights: made once per autocast forward (`cast_projection_weights`)
or kept current by `LitesparkAdamW` across steps (`CastShadow`), and read by the Litespark modules."""

from __future__ import annotations

import torch
import torch.nn as nn

import litespark_kernels as lk
from litespark_kernels._dispatch import autocast_dtype
from litespark_kernels.ops.linear import _plain_tensor, weight_views

from .model_utils import set_module_flag


def _cast_of(module: nn.Module, slot: str) -> torch.Tensor | None:
    casts = module.__dict__.get("_litespark_casts")
    return None if casts is None else casts.get(slot)


def projection(module: nn.Module, slot: str) -> dict:
    """The keyword arguments of a projection group's `fused_linear` call: its weights' cast for this forward
    (``cast``, or None) and whether it runs in float8 (``fp8``: `LitesparkConfig.fp8`, set on the module by
    `set_fp8`)."""
    return {"cast": _cast_of(module, slot), "fp8": module.__dict__.get(_FP8_ATTR, False)}


_FP8_ATTR = "_litespark_fp8"


def set_fp8(model: nn.Module, enabled: bool) -> int:
    """Mark (or unmark) every Litespark module with fused projection groups (attention, MLP) to run them in float8
    (`projection`); the LM head, MoE experts, LoRA adapters and SAT's sparse GEMMs never read the mark. Returns
    how many modules have fused projection groups now marked (0 when unmarking)."""
    return set_module_flag(model, _FP8_ATTR, enabled, lambda m: hasattr(m, "litespark_cast_groups") and bool(
        set(m.litespark_cast_groups()) - {"lm_head"}))  # the LM head stays in the compute dtype


def link_cast_owners(model: nn.Module) -> int:
    """Record on ``model`` the Litespark modules whose projection weights `cast_projection_weights` casts."""
    owners = [m for m in model.modules() if hasattr(m, "litespark_cast_groups")]
    model.__dict__["_litespark_cast_owners"] = owners
    # transformers sets ``gradient_checkpointing`` on each decoder layer (and the model) it checkpoints
    model.__dict__["_litespark_gc_flags"] = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    return len(owners)


def unlink_cast_owners(model: nn.Module) -> None:
    detach_cast_shadow(model)
    set_fp8(model, False)
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
